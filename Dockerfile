# GPU inference image:  docker build -t autotransfer .
#                       docker run --gpus all -v $PWD:/models -v $PWD/images:/data autotransfer predict /models/model.onnx /data/a.png
#
# Final stage: python:3.11-slim plus the CUDA 13 runtime / cuDNN 9 wheels that onnxruntime-gpu[cuda,cudnn] pulls from
# PyPI. That is only the libraries onnxruntime loads, at the versions it was built for; an nvidia/cuda:13.x-cudnn-
# runtime base carries every CUDA library (cuFFT, cuSPARSE, NPP, nvJPEG, ...) and has no Python >= 3.11. `predict`
# imports neither torch, onnx nor optuna, so autotransfer goes in with --no-deps and only its inference requirements
# (the gpu extra + numpy + pillow) follow: no multi-GB torch, no compilers. TensorRT is not bundled (large); with
# --provider auto, predict uses CUDA, or TensorRT when a derived image adds its libraries.

# Build stage: the autotransfer wheel (pip's build backend stays here).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY autotransfer ./autotransfer
RUN pip wheel --no-deps --no-cache-dir --wheel-dir /wheels .

# Runtime stage.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
# autotransfer[gpu] for inference only: the gpu extra's requirement, predict's numpy + pillow; --no-deps keeps torch out.
RUN pip install --no-deps /wheels/autotransfer-*.whl \
    && pip install "onnxruntime-gpu[cuda,cudnn]>=1.18" "numpy>=1.24" "pillow>=10.0" \
    && rm -rf /wheels
WORKDIR /work
ENTRYPOINT ["autotransfer"]
CMD ["predict", "--help"]
