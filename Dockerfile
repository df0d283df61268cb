# raycake's image for KubeRay (deploy/kuberay/*.yaml): Ray, torch and this repository, installed.
#
# Build and push (CPU; replace registry.example.com with your registry):
#   docker build -t registry.example.com/raycake:latest .
#   docker push registry.example.com/raycake:latest
# CUDA (GPU nodes; then add nvidia.com/gpu: 1 to the workers' resources and set
# instance_num_gpus: 1 in the cluster config):
#   docker build \
#     --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-cu128 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     -t registry.example.com/raycake:latest-cu128 .
#
# The manifests' rayVersion (2.60.0) must match the base image's Ray.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# torch first, from its own index: the default PyPI wheel would bring CUDA libraries a CPU image
# does not need; `pip install .` then finds torch>=2.5 already satisfied.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The repository stays at the working directory: the RayJob and RayService point at
# /home/ray/raycake/examples/cluster-kuberay.yaml.
WORKDIR /home/ray/raycake
COPY --chown=ray:users . .
RUN pip install --no-cache-dir .
