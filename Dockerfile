# The app and the worker share this image; compose.yaml runs one of each plus PostgreSQL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    APP_HOME=/data TORCH_HOME=/data/torch AUTH_MODE=password
WORKDIR /app

COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt "psycopg[binary]>=3.1"

COPY core ./core
COPY pages ./pages
COPY streamlit_app.py serve.py ./
COPY .streamlit ./.streamlit

# Runs as an unprivileged user; /data holds images, checkpoints and (without PostgreSQL) the database.
RUN useradd --create-home --uid 1000 app && mkdir -p /data && chown app /data
USER app
VOLUME ["/data"]
EXPOSE 8501
# Every interface of the container, which only a server with sign-in may do (serve.py refuses it with
# AUTH_MODE=none); compose.yaml publishes the port on the host's loopback unless told otherwise.
CMD ["streamlit", "run", "serve.py", "--server.address=0.0.0.0", "--server.port=8501"]
