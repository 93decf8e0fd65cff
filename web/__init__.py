"""The web tier (Flask). The app factory is web.app.create_app; this package itself imports
nothing, so that gunicorn's master can load web.gunicorn_worker without building the app."""
