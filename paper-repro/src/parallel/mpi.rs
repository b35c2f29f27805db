//! The MPI backend (the `mpi` crate, rsmpi, over the system's MPI library: Debian's OpenMPI).
//!
//! MPI is initialised with `MPI_THREAD_FUNNELED`: the compute threads (rayon, gemm) never call
//! MPI; only the main thread does, between the micro-batches' passes.

use anyhow::{bail, Context, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;

use super::{Backend, Collective};

/// MPI, initialised for this process (finalised when dropped, after every collective).
pub struct Mpi {
    universe: Universe,
}

impl Mpi {
    /// Initialise MPI (once per process).
    pub fn init() -> Result<Self> {
        let (universe, threading) =
            mpi::initialize_with_threading(Threading::Funneled).context("MPI is initialised already")?;
        if threading < Threading::Funneled {
            bail!("the MPI library offers thread level {threading:?}; data-parallel training needs Funneled");
        }
        Ok(Self { universe })
    }

    /// The collective over every process of the job.
    pub fn world(&self) -> MpiCollective {
        MpiCollective { world: self.universe.world() }
    }

    /// End the whole job (every process) with `code`, as `mpirun` reports it.
    pub fn abort(&self, code: i32) -> ! {
        self.universe.world().abort(code)
    }
}

/// [`Collective`] over MPI's world communicator.
pub struct MpiCollective {
    world: SimpleCommunicator,
}

impl Collective for MpiCollective {
    fn process(&self) -> u64 {
        self.world.rank() as u64
    }
    fn processes(&self) -> u64 {
        self.world.size() as u64
    }
    fn backend(&self) -> Backend {
        Backend::Mpi
    }
    fn sum_f32(&self, v: &mut [f32]) -> Result<()> {
        let send = v.to_vec();
        self.world.all_reduce_into(&send[..], v, SystemOperation::sum());
        Ok(())
    }
    fn sum_f64(&self, v: &mut [f64]) -> Result<()> {
        let send = v.to_vec();
        self.world.all_reduce_into(&send[..], v, SystemOperation::sum());
        Ok(())
    }
    fn agree(&self, value: u64) -> Result<bool> {
        let (mut lo, mut hi) = (0u64, 0u64);
        self.world.all_reduce_into(&value, &mut lo, SystemOperation::min());
        self.world.all_reduce_into(&value, &mut hi, SystemOperation::max());
        Ok(lo == hi)
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
}
