# Lumen: precompute (NVIDIA GPU via `docker run --gpus all`) and the review dashboard, one image.
# The pinned torch wheel bundles its CUDA libraries; the host needs only the NVIDIA driver and the
# NVIDIA Container Toolkit. See README.md "Docker" for the build and run lines.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    XDG_CACHE_HOME=/cache STREAMLIT_BROWSER_GATHER_USAGE_STATS=false
WORKDIR /app

COPY requirements.txt .
RUN pip install -r requirements.txt

COPY precompute/ precompute/
COPY dashboard/ dashboard/
COPY pyproject.toml README.md ./
# Lumen itself (its dependencies are the pins above), so `streamlit run dashboard/app.py` imports it.
RUN pip install --no-deps -e .

# Slides and atlases live on mounted volumes: /data (input, read-only is fine) and /out.
VOLUME ["/data", "/out", "/cache"]
EXPOSE 8501
ENTRYPOINT ["python", "-m", "precompute"]
CMD ["--help"]
