# One image for the API, the workers, beat and webhooks; the command picks the role.
FROM python:3.11-slim
WORKDIR /app
# A C compiler: one of the AWQ loader's dependencies (pypcre, via gptqmodel) builds from source.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# torch first: on a GPU host pip takes the CUDA build of this version.
RUN pip install --no-cache-dir torch==2.13.0
COPY pyproject.toml README.md ./
COPY api api
COPY worker worker
COPY jobs jobs
COPY migrations migrations
COPY mbatch mbatch
RUN pip install --no-cache-dir ".[worker]"
ENV MBATCH_MODELS_DIR=/models
CMD ["mbatch", "api", "--host", "0.0.0.0", "--port", "8000"]
