# Cluster settings for examples/slurm/train.sbatch, sourced by the batch shell before srun
# (the ranks inherit them). Copy this file, edit the copy for your cluster, and submit with
#   COPD_ENV_FILE=/path/to/my_cluster_env.sh sbatch examples/slurm/train.sbatch CONFIG ...
# Without COPD_ENV_FILE the script sources this file, whose active lines are safe defaults
# (each keeps a value you exported yourself). Everything else is commented out: uncomment what
# your cluster's documentation asks for.

# --- Megatron --------------------------------------------------------------------------------
# Tensor-parallel communication overlaps with compute only when kernels run in order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

# --- NCCL ------------------------------------------------------------------------------------
# A rank that loses a peer fails with an error instead of hanging until the collective timeout.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# WARN prints the reason of a failure; INFO adds the chosen transports (IB, NVLink) at start-up.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# InfiniBand / RoCE: the HCAs to use (`ibv_devices` lists them) and, for RoCE, the GID index.
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7
# export NCCL_IB_GID_INDEX=3
# The interface for NCCL's bootstrap and socket traffic (`ip -br addr`); the same for gloo, which
# carries CPU-side collectives and checkpoint metadata.
# export NCCL_SOCKET_IFNAME=ib0
# export GLOO_SOCKET_IFNAME=ib0
# Clusters without InfiniBand (Ethernet only):
# export NCCL_IB_DISABLE=1
# AWS EFA / GCP GPUDirect-TCPX ship their own NCCL plugins; follow the provider's settings, e.g.
# export FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1

# --- Rendezvous ------------------------------------------------------------------------------
# The ranks meet at the first node of the allocation on port 10000 + job id mod 20000. When
# the node's host name resolves to an interface the other nodes cannot reach (a management
# network), name the right one, e.g. its InfiniBand address; a firewalled port can be moved.
# export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')-ib
# export MASTER_PORT=29500
# A run that does not start reports which ranks are missing after parallel.rendezvous_timeout_s
# (600 s by default); lower it to fail faster while debugging a new cluster.

# --- Containers (pyxis / enroot) -------------------------------------------------------------
# srun arguments are appended through COPD_SRUN_ARGS (split on spaces). Mount the repository and
# the data at the same paths, and point COPD_PYTHON at the Python *inside* the image that has
# this package installed (pip install -e . in the image or a mounted venv built against it):
# export COPD_SRUN_ARGS="--container-image=/shared/images/copd.sqsh --container-mounts=/shared:/shared --container-workdir=$SLURM_SUBMIT_DIR"
# export COPD_PYTHON=/usr/bin/python
# Apptainer/Singularity instead: COPD_PYTHON can be a wrapper script that runs
#   apptainer exec --nv /shared/images/copd.sif python "$@"
# Signals still reach the training ranks: srun relays them into the container.
