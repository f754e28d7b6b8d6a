"""The Flask example as gunicorn serves it in the deployment tests, with one header more.

``X-Worker`` names the process that served the response, so a test can tell the workers
apart; everything else is ``examples/flask_shop.py`` unchanged (on ``sys.path``).
"""

from __future__ import annotations

import os

import flask_shop
from flask import Flask, Response


def create_app() -> Flask:
    app = flask_shop.create_app()

    @app.after_request
    def served_by(response: Response) -> Response:
        response.headers["X-Worker"] = str(os.getpid())
        return response

    return app
