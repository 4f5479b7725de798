# GPU inference image: `docker run --gpus all IMAGE predict /models/model.onnx /data/*.png`
# Build stage: make a wheel of autotransfer (no build tools reach the final image).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY autotransfer ./autotransfer
RUN pip wheel --no-deps --wheel-dir /wheels .

# Runtime: CUDA 13 / cuDNN 9 come from the onnxruntime-gpu[cuda,cudnn] and torch wheels.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install "torch>=2.4" "torchvision>=0.19" \
    && pip install "$(ls /wheels/autotransfer-*.whl)[gpu]" \
    && rm -rf /wheels
WORKDIR /work
ENTRYPOINT ["autotransfer"]
CMD ["--help"]
