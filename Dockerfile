# The image cluster nodes run (KubeRay's RayJob, or `docker.image` in cluster.yaml): Ray 2.60 with synray and its
# GPU extras (vLLM, CUDA torch). Build it from the project root: docker build -t REGISTRY/synray:0.1.0 .
FROM rayproject/ray:2.60.0-py311-gpu
COPY --chown=ray:users . /home/ray/synray
RUN pip install --no-cache-dir -e '/home/ray/synray[gpu,wandb]'
WORKDIR /home/ray/synray
