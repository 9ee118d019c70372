"""The HTTP API beside the pages: /api/v1 on the web app's own port (serve.py passes `api_routes` to
st.App), a FastAPI app: JSON in and out, bearer tokens for who is asking. Its endpoints call the same
core functions as the pages and the command line, and hold no logic of their own. The top of the
flow, like core/jobs: may import every other package; never streamlit."""
