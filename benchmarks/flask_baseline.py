"""The usual synchronous Flask + Keras demo, kept as a reference point for the benchmark only.

Written the way people write it first: load the model at import, decode the upload, resize,
`model.predict` on one image per request, return the top 3. Not part of the product.
"""

import io
import json
import os

import keras
import numpy as np
from flask import Flask, jsonify, request
from PIL import Image

from shared.settings import DEFAULT_MODEL_DIR

MODEL_DIR = os.environ.get("MODEL_DIR", str(DEFAULT_MODEL_DIR))
model = keras.saving.load_model(os.path.join(MODEL_DIR, "model.keras"), compile=False)
CLASSES = json.load(open(os.path.join(MODEL_DIR, "model.json")))["classes"]

app = Flask(__name__)


@app.post("/predict")
def predict():
    img = Image.open(io.BytesIO(request.files["image"].read())).convert("RGB").resize((32, 32))
    probs = keras.ops.softmax(model.predict(np.asarray(img)[None], verbose=0)[0]).numpy()
    top = np.argsort(-probs)[:3]
    return jsonify(predictions=[{"label": CLASSES[i], "probability": float(probs[i])} for i in top])
