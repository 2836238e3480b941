"""Launcher environments (torchrun, Slurm) and Slurm node-list expansion."""

from copd_megatron.distributed.init import parse_slurm_nodelist, read_dist_env


def test_nodelist_expansion():
    assert parse_slurm_nodelist("node1") == ["node1"]
    assert parse_slurm_nodelist("gpu[001-003,7],cpu1") == ["gpu001", "gpu002", "gpu003", "gpu7", "cpu1"]
    assert parse_slurm_nodelist("a[9-10]") == ["a9", "a10"]


def test_torchrun_env_wins_over_slurm():
    env = read_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
                         "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})  # fmt: skip
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3, 8, 1, "h", 1234, "torchrun")  # fmt: skip


def test_slurm_env_master_from_first_node_and_port_from_job_id():
    env = read_dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                         "SLURM_JOB_NODELIST": "dgx[07-08]", "SLURM_JOB_ID": "123456"})  # fmt: skip
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 5, "slurm")
    assert env.master_addr == "dgx07" and env.master_port == 10000 + 123456 % 20000
    # Below the kernel's ephemeral range (32768+), and MASTER_ADDR/MASTER_PORT win when exported.
    assert all(10000 <= read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": str(j)}).master_port
               < 30000 for j in (0, 1, 19999, 20000, 987654321))  # fmt: skip
    env = read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "dgx[07-08]",
                         "SLURM_JOB_ID": "5", "MASTER_ADDR": "dgx07-ib", "MASTER_PORT": "29500"})  # fmt: skip
    assert (env.master_addr, env.master_port) == ("dgx07-ib", 29500)


def test_no_launcher_is_a_world_of_one():
    env = read_dist_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
