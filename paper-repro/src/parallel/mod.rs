//! Data-parallel training across processes, on existing collective engines.
//!
//! One spec is one run however it is executed: a spec with `ranks = N` trains the same
//! (bit-identical on the CPU for N = 2, see [`Collective::sum_f32`]) in one process computing all N
//! ranks ([`SingleProcess`], the emulation) or in N processes, one rank each, that sum their
//! gradients, losses and hyper-gradients once per update ([`Collective`]). Every process applies
//! the identical optimizer update, so the parameters stay equal without a broadcast; a checksum
//! compared across the processes at every evaluation fails the run loudly if they ever differ.
//! Only the process of rank 0 writes the run folder (logs, evaluations, checkpoints, result).
//!
//! Backends:
//! - MPI (feature `mpi`, the `mpi` crate over Debian's OpenMPI): CPU processes, launched by
//!   `paper-repro launch --processes N` (`just train-dp N SPEC OUT`) or by `mpirun -n N
//!   paper-repro train SPEC --out DIR --data-parallel mpi` directly.
//! - NCCL (feature `nccl`, with `cuda`): one process per GPU, launched by `paper-repro launch
//!   --backend nccl --processes N` ([`nccl`]).
//!
//! A process that dies or fails on its own ends the job: MPI's default error handler makes every
//! collective call of the others fatal, the failing process calls `MPI_Abort` after printing its
//! error with its rank, and `mpirun` names the rank in its message. Failures every process sees
//! alike (a diverged loss, gradient or hyper-gradient, found on the summed values; ranks whose
//! parameters differ) end every process with the same error, after rank 0 has written
//! `failed.json`. Checkpoints are written atomically, so whichever process dies, the last complete
//! checkpoint is intact and the job resumes from it with `--resume`.

use std::ops::Range;

use anyhow::Result;
use candle_core::{Tensor, Var};

pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

/// What runs the ranks of a data-parallel world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// One process computing every rank.
    SingleProcess,
    /// One MPI process per rank (CPU).
    Mpi,
    /// One process per GPU, NCCL (feature `nccl`).
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::SingleProcess => "single-process",
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
        }
    }
}

/// Sums across the processes of a data-parallel run. Every call is collective: every process
/// makes the same calls in the same order.
pub trait Collective {
    /// This process's index among [`Collective::processes`], from 0.
    fn process(&self) -> u64;
    /// Processes taking part.
    fn processes(&self) -> u64;
    fn backend(&self) -> Backend;
    /// Sum `v` over the processes, in place (every process gets the sum). Two summands add
    /// exactly as one process adds them (IEEE addition commutes); with more, the engine's
    /// reduction order may differ from rank order in the last bits.
    fn sum_f32(&self, v: &mut [f32]) -> Result<()>;
    /// As [`Collective::sum_f32`], in f64.
    fn sum_f64(&self, v: &mut [f64]) -> Result<()>;
    /// Whether `value` is the same on every process.
    fn agree(&self, value: u64) -> Result<bool>;
    /// Wait until every process has come here.
    fn barrier(&self) -> Result<()>;
    /// Sum tensors over the processes in one call (every process gets the sums). By default
    /// through the host: flattened to one f32 buffer, [`Collective::sum_f32`], split back into
    /// tensors of the original shapes and devices; a GPU backend sums on the device.
    fn sum_tensors(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        sum_tensors_on_host(self, tensors)
    }

    /// The ranks of a world of `world` ranks this process computes, in order (a contiguous
    /// share; `world` is a multiple of the processes, checked at start).
    fn ranks_here(&self, world: u64) -> Range<u64> {
        share(self.process(), self.processes(), world)
    }
    /// Whether this process writes the run folder (it computes rank 0).
    fn writes(&self) -> bool {
        self.process() == 0
    }
}

/// The ranks of a world of `world` that process `process` of `processes` computes: a contiguous
/// share, in order.
pub fn share(process: u64, processes: u64, world: u64) -> Range<u64> {
    let each = world / processes.max(1);
    process * each..(process + 1) * each
}

/// Whether every process of a data-parallel run finds this error alike: a divergence (found on
/// the summed values) or disagreeing parameters. Rank 0 reports it and writes failed.json; the
/// others end quietly with the same exit code. Any other error is one process's own.
pub fn is_shared_failure(e: &anyhow::Error) -> bool {
    e.downcast_ref::<crate::run::Diverged>().is_some() || e.downcast_ref::<RanksDisagree>().is_some()
}

/// Every rank in this process: nothing to sum.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn process(&self) -> u64 {
        0
    }
    fn processes(&self) -> u64 {
        1
    }
    fn backend(&self) -> Backend {
        Backend::SingleProcess
    }
    fn sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn agree(&self, _: u64) -> Result<bool> {
        Ok(true)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// [`Collective::sum_tensors`] through the host.
fn sum_tensors_on_host<C: Collective + ?Sized>(collective: &C, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut flat = Vec::with_capacity(tensors.iter().map(|t| t.elem_count()).sum());
    for t in tensors {
        flat.extend(t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?);
    }
    collective.sum_f32(&mut flat)?;
    let mut out = Vec::with_capacity(tensors.len());
    let mut at = 0;
    for t in tensors {
        let n = t.elem_count();
        out.push(Tensor::from_slice(&flat[at..at + n], t.shape(), t.device())?.to_dtype(t.dtype())?);
        at += n;
    }
    Ok(out)
}

/// A checksum of the parameters' bits, the same on every process exactly when the parameters
/// are (up to a 2⁻⁶⁴ chance): each f32's bits mixed with its position, summed with wrapping.
pub fn parameter_checksum(vars: &[Var]) -> Result<u64> {
    let mut sum = 0u64;
    let mut position = 0u64;
    for v in vars {
        for x in v.as_tensor().flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()? {
            position += 1;
            let mixed = (u64::from(x.to_bits()) ^ position.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .wrapping_mul(0xBF58_476D_1CE4_E5B9);
            sum = sum.wrapping_add(mixed ^ (mixed >> 31));
        }
    }
    Ok(sum)
}

/// The ranks' parameters differ: the run is no longer one run. Every process sees it.
#[derive(Debug, thiserror::Error)]
#[error("update {update}: the parameters differ between the processes (checksums disagree); the run is stopped")]
pub struct RanksDisagree {
    pub update: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_process_computes_its_contiguous_share_of_the_ranks() {
        assert_eq!(SingleProcess.ranks_here(8), 0..8);
        assert_eq!(share(0, 2, 2), 0..1);
        assert_eq!(share(1, 2, 2), 1..2);
        assert_eq!(share(1, 2, 8), 4..8);
        assert!(SingleProcess.writes());
    }

    #[test]
    fn summing_tensors_keeps_shapes_and_values_and_the_checksum_sees_one_bit() {
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[5f32], &Device::Cpu).unwrap();
        let out = SingleProcess.sum_tensors(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(out[0].to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert_eq!(out[1].to_vec1::<f32>().unwrap(), vec![5.]);
        let v = Var::from_tensor(&a).unwrap();
        let w = Var::from_tensor(
            &Tensor::new(&[[1f32, 2.], [3., f32::from_bits(4f32.to_bits() ^ 1)]], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let swapped = Var::from_tensor(&Tensor::new(&[[2f32, 1.], [3., 4.]], &Device::Cpu).unwrap()).unwrap();
        let c = parameter_checksum(std::slice::from_ref(&v)).unwrap();
        assert_eq!(c, parameter_checksum(&[Var::from_tensor(&a).unwrap()]).unwrap());
        assert_ne!(c, parameter_checksum(&[w]).unwrap(), "one flipped bit");
        assert_ne!(c, parameter_checksum(&[swapped]).unwrap(), "two values swapped");
    }
}
