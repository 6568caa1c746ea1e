"""The Gradio clinical exploration app (``m3bind serve``): see :mod:`app.web.app`."""
