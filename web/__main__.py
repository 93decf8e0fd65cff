"""Development server: `python -m web [--host H] [--port N]` (gunicorn serves it in production)."""

import argparse

from shared.settings import Settings
from web.app import create_app

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()
    settings = Settings.from_env()
    create_app(settings).run(args.host, args.port, threaded=True, debug=settings.debug)
