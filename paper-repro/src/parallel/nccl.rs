//! The NCCL backend (feature `nccl`: candle's `nccl`, cudarc's NCCL bindings, libnccl loaded at
//! run time): one process per GPU, the gradients all-reduced on the device.
//!
//! `paper-repro launch --backend nccl --processes N` starts the N processes itself (NCCL has
//! no launcher): process r sees only GPU r (`CUDA_VISIBLE_DEVICES`), and learns its rank, the
//! world size and a job token from `MADA_NCCL_RANK`, `MADA_NCCL_WORLD`, `MADA_NCCL_JOB`. Rank 0
//! creates NCCL's unique id and shares it through a file in the run folder
//! (`.nccl-id-<job>`, written atomically, removed once every rank has joined).
//!
//! Ordering: candle's kernels and the communicator may run on different CUDA streams, so each
//! all-reduce waits for the tensor's device before it starts and for the communicator's stream
//! before its result is used (two synchronisations per all-reduce; an update has two).
//!
//! Not yet run on GPUs by this project (no multi-GPU machine was available): compiled and linted
//! in CI by `just check-cuda`; `gpu-check` runs a world of one through it where libnccl loads.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::{Backend, Collective};

/// A communicator handed to candle's custom-op machinery, which asks for Send + Sync.
struct SharedComm(Comm);
// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; every call goes through the Mutex in `Nccl`.
unsafe impl Send for SharedComm {}

/// [`Collective`] over an NCCL communicator.
pub struct Nccl {
    comm: Arc<Mutex<SharedComm>>,
    device: Device,
    rank: u64,
    world: u64,
}

/// This process's place in a job `launch` started.
pub struct Place {
    pub rank: u64,
    pub world: u64,
    pub job: String,
}

impl Place {
    /// From the environment `launch` sets; None when not started by it.
    pub fn from_env() -> Result<Option<Self>> {
        let get = |k: &str| std::env::var(k).ok();
        let (Some(rank), Some(world), Some(job)) =
            (get("MADA_NCCL_RANK"), get("MADA_NCCL_WORLD"), get("MADA_NCCL_JOB"))
        else {
            return Ok(None);
        };
        let rank: u64 = rank.parse().context("MADA_NCCL_RANK is not a number")?;
        let world: u64 = world.parse().context("MADA_NCCL_WORLD is not a number")?;
        if rank >= world {
            bail!("MADA_NCCL_RANK = {rank} is not below MADA_NCCL_WORLD = {world}");
        }
        Ok(Some(Self { rank, world, job }))
    }
}

fn id_file(dir: &Path, job: &str) -> std::path::PathBuf {
    dir.join(format!(".nccl-id-{job}"))
}

impl Nccl {
    /// Join the job's communicator on `device` (this process's GPU), meeting the others through
    /// `dir` (the run folder); waits up to 5 minutes for rank 0's id.
    pub fn join(device: &Device, place: &Place, dir: &Path) -> Result<Self> {
        let Device::Cuda(cuda) = device else { bail!("the NCCL backend trains on a CUDA device (device = \"cuda\")") };
        let file = id_file(dir, &place.job);
        let id = if place.rank == 0 {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let id = Id::new().map_err(|e| anyhow!("NCCL cannot create a unique id: {e:?}"))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            outputs::write_atomically(&file, &bytes)?;
            id
        } else {
            let t = Instant::now();
            loop {
                if let Ok(bytes) = std::fs::read(&file) {
                    if bytes.len() == 128 {
                        let mut internal = [0 as std::ffi::c_char; 128];
                        internal.iter_mut().zip(&bytes).for_each(|(c, &b)| *c = b as std::ffi::c_char);
                        break Id::uninit(internal);
                    }
                }
                if t.elapsed() > Duration::from_secs(300) {
                    bail!("rank {}: no NCCL id from rank 0 in {} after 5 minutes", place.rank, file.display());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let stream: Arc<CudaStream> = cuda.cuda_stream();
        let comm = Comm::from_rank(stream, place.rank as usize, place.world as usize, id)
            .map_err(|e| anyhow!("rank {}: NCCL cannot join the communicator: {e:?}", place.rank))?;
        let nccl = Self {
            comm: Arc::new(Mutex::new(SharedComm(comm))),
            device: device.clone(),
            rank: place.rank,
            world: place.world,
        };
        // Every rank has joined once this returns: the id is no longer needed.
        nccl.barrier()?;
        if place.rank == 0 {
            let _ = std::fs::remove_file(&file);
        }
        Ok(nccl)
    }

    /// A world of one on `device`: the NCCL path with nothing to sum (gpu-check).
    pub fn alone(device: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = device else { bail!("the NCCL backend needs a CUDA device") };
        let id = Id::new().map_err(|e| anyhow!("NCCL cannot create a unique id: {e:?}"))?;
        let comm = Comm::from_rank(cuda.cuda_stream(), 0, 1, id).map_err(|e| anyhow!("NCCL: {e:?}"))?;
        Ok(Self { comm: Arc::new(Mutex::new(SharedComm(comm))), device: device.clone(), rank: 0, world: 1 })
    }

    fn reduce(&self, t: &Tensor, op: Reduction) -> Result<Tensor> {
        Ok(t.contiguous()?.apply_op1_no_bwd(&AllReduce { comm: self.comm.clone(), op })?)
    }

    fn host_reduce<T: candle_core::WithDType>(&self, v: &mut [T], op: Reduction) -> Result<()> {
        let t = Tensor::from_slice(v, v.len(), &self.device)?;
        let out = self.reduce(&t, op)?.to_vec1::<T>()?;
        v.copy_from_slice(&out);
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Reduction {
    Sum,
    Min,
    Max,
}

/// An all-reduce as a candle operator: a fresh output buffer on the device.
struct AllReduce {
    comm: Arc<Mutex<SharedComm>>,
    op: Reduction,
}

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else { candle_core::bail!("all-reduce: not contiguous") };
        let op = match self.op {
            Reduction::Sum => ReduceOp::Sum,
            Reduction::Min => ReduceOp::Min,
            Reduction::Max => ReduceOp::Max,
        };
        let comm = self.comm.lock().map_err(|_| candle_core::Error::Msg("NCCL communicator poisoned".into()))?;
        let dev = s.device.clone();
        // The inputs are written by candle's stream: wait for them.
        dev.synchronize()?;
        macro_rules! reduce {
            ($slice:expr, $t:ty) => {{
                let src = $slice.slice(start..end);
                let mut dst = dev.alloc_zeros::<$t>(end - start)?;
                comm.0
                    .all_reduce(&src, &mut dst, &op)
                    .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
                comm.0.stream().synchronize().map_err(|e| candle_core::Error::Msg(format!("NCCL stream: {e:?}")))?;
                CudaStorage::wrap_cuda_slice(dst, dev.clone())
            }};
        }
        let out = match &s.slice {
            CudaStorageSlice::F32(x) => reduce!(x, f32),
            CudaStorageSlice::F64(x) => reduce!(x, f64),
            CudaStorageSlice::I64(x) => reduce!(x, i64),
            _ => candle_core::bail!("all-reduce: dtype {:?} is not summed here", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }
}

impl Collective for Nccl {
    fn process(&self) -> u64 {
        self.rank
    }
    fn processes(&self) -> u64 {
        self.world
    }
    fn backend(&self) -> Backend {
        Backend::Nccl
    }
    fn sum_f32(&self, v: &mut [f32]) -> Result<()> {
        self.host_reduce(v, Reduction::Sum)
    }
    fn sum_f64(&self, v: &mut [f64]) -> Result<()> {
        self.host_reduce(v, Reduction::Sum)
    }
    fn agree(&self, value: u64) -> Result<bool> {
        // NCCL has no unsigned 64-bit type in candle: compare the bits as i64.
        let (mut lo, mut hi) = ([value as i64], [value as i64]);
        self.host_reduce(&mut lo, Reduction::Min)?;
        self.host_reduce(&mut hi, Reduction::Max)?;
        Ok(lo == hi)
    }
    fn barrier(&self) -> Result<()> {
        self.host_reduce(&mut [0f32], Reduction::Sum)
    }
    /// On the device: the gradients concatenated into one buffer, summed in place of a copy
    /// through the host.
    fn sum_tensors(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        if tensors.is_empty() {
            return Ok(Vec::new());
        }
        let dtype = tensors[0].dtype();
        let flat: Vec<Tensor> =
            tensors.iter().map(|t| t.flatten_all()?.to_dtype(DType::F32)).collect::<candle_core::Result<_>>()?;
        let summed = self.reduce(&Tensor::cat(&flat, 0)?, Reduction::Sum)?;
        let mut out = Vec::with_capacity(tensors.len());
        let mut at = 0;
        for t in tensors {
            let n = t.elem_count();
            out.push(summed.narrow(0, at, n)?.reshape(t.shape())?.to_dtype(dtype)?);
            at += n;
        }
        Ok(out)
    }
}
