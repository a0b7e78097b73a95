# curry-train: the package and its dependencies; runs the training entry point by default.
#   docker build -t curry-train .
#   docker run --rm curry-train                                          # the CPU demo
#   docker run --rm curry-train torchrun --standalone --nproc_per_node=2 -m curry_train.train train.steps=50
FROM python:3.11-slim
WORKDIR /app
# The CPU wheel of torch first, so the project's install does not pull a CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY curry_train ./curry_train
COPY conf ./conf
RUN pip install --no-cache-dir .
WORKDIR /work
ENV PYTHONUNBUFFERED=1
CMD ["python", "-m", "curry_train.train"]
