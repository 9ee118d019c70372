"""Entry point: `streamlit run streamlit_app.py`. Routes to the pages; the pages call core/."""

import streamlit as st

st.set_page_config(page_title="Lymphoma subtype recognition", page_icon="🔬", layout="wide")

pages = [
    st.Page("pages/home.py", title="Home", icon="🏠", default=True),
]
st.navigation(pages).run()
