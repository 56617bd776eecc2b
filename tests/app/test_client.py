"""The generate endpoint through gradio_client, against the app served in-process."""

import pytest

from tests.app.conftest import form


@pytest.fixture
def served(studio_env, monkeypatch):
    import app

    studio, _ = studio_env
    monkeypatch.setattr(app, "Studio", lambda model=None: studio)
    demo = app.build_app()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    yield demo
    demo.close()


def test_generate_endpoint_returns_images(served):
    from gradio_client import Client

    client = Client(served.local_url, verbose=False)
    gallery, masks, info = client.predict("", *form(rows=["one"], batch=1), api_name="/generate")
    assert len(gallery) == 1 and info.startswith("1 image(s) · seed 3")
