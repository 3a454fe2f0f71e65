# One image for the API, the workers and beat; the command picks the role.
FROM python:3.11-slim
WORKDIR /app
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
