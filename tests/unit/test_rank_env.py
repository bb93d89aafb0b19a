"""Rank detection from each launcher's environment (hand-written environments)."""

from trellis.launchers.rank_env import _tasks_on_this_node, expand_hostlist, rank_env


def test_not_under_a_launcher():
    assert rank_env({"HOME": "/root"}) is None


def test_torchrun():
    e = rank_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_addr, e.master_port, e.source) == \
        (3, 8, 1, 2, "10.1.2.3", 1234, "torchrun")


def test_open_mpi_has_no_address_until_shared():
    e = rank_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                  "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.source) == (1, 2, 1, None, "openmpi")


def test_mpich():
    e = rank_env({"PMI_RANK": "5", "PMI_SIZE": "6", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "3"})
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.source) == (5, 6, 1, 3, "mpich")


def test_slurm_srun_uses_first_node_and_job_port():
    e = rank_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0",
                  "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "127.0.0.[1-2]", "SLURM_JOB_ID": "42",
                  "SLURM_STEP_TASKS_PER_NODE": "2(x2)"})
    assert (e.rank, e.world_size, e.local_world_size, e.master_addr, e.master_port) == (2, 4, 2, "127.0.0.1", 20042)


def test_hostlist_expansion():
    assert expand_hostlist("n[1-3,5],gpu07") == ["n1", "n2", "n3", "n5", "gpu07"]
    assert expand_hostlist("node[08-10]") == ["node08", "node09", "node10"]
    assert _tasks_on_this_node({"SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}) == 1
