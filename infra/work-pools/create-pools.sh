#!/usr/bin/env bash
# Create (or update) the pipeline's two work pools on the Prefect server that PREFECT_API_URL names.
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api infra/work-pools/create-pools.sh
#
# blip2-cpu  process pool: ingest (img2dataset), demo, catalog work; one worker per CPU machine.
# blip2-gpu  kubernetes pool: CapFilt, training, fine-tuning, evaluation as GPU Jobs. Its concurrency
#            limit caps the GPU flow runs in flight (each run asks for `gpus` GPUs, see the template);
#            the deployments of infra/prefect.yaml add a limit of their own per stage.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
GPU_POOL_LIMIT="${GPU_POOL_LIMIT:-4}"

prefect work-pool create blip2-cpu --type process \
    --base-job-template "$here/process.json" --overwrite
prefect work-pool create blip2-gpu --type kubernetes \
    --base-job-template "$here/kubernetes-gpu.json" --overwrite
prefect work-pool set-concurrency-limit blip2-gpu "$GPU_POOL_LIMIT"

cat <<MSG
Pools created. Start their workers:
  CPU machines:   cd <repository checkout> && prefect worker start --pool blip2-cpu
  in the cluster: prefect worker start --pool blip2-gpu --type kubernetes   (needs prefect-kubernetes)
MSG
