//! `paper-repro launch --processes N SPEC --out DIR`: one command that starts N processes of
//! this program, each training one rank of the spec's run: under `mpirun` (`--backend mpi`, CPU)
//! or started here, one per GPU (`--backend nccl`).
//!
//! Everything that can be known before the processes start is checked here, with one error:
//! the spec (its `ranks` must be N, its device the backend's), this build's support for the
//! backend, `mpirun` on the PATH. Under MPI each process gets `RAYON_NUM_THREADS` = cores / N
//! (unless the caller set it), so the N processes share the machine's cores instead of each
//! taking all of them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::parallel::Backend;
use crate::run::spec::{DeviceKind, RunSpec};
use crate::run::Diverged;

/// What `launch` passes through to every process's `train`.
#[derive(Clone, Debug, Default)]
pub struct LaunchOptions {
    pub resume: bool,
    /// Resume if the folder holds a checkpoint of this spec, else start (`train --auto`).
    pub auto: bool,
    pub pause_after: Option<u64>,
    /// Rank 0 prints `progress UPDATE …` lines for a parent's progress bar (`reproduce`).
    pub progress_lines: bool,
}

/// The checks a data-parallel run of `processes` processes of `backend` must pass before any
/// starts (also made by each process, for runs started with `mpirun` directly).
pub fn check_spec(spec: &RunSpec, processes: u64, backend: Backend) -> Result<()> {
    spec.validate()?;
    if spec.ranks != processes {
        bail!(
            "the spec's ranks = {} but {processes} processes were asked for: a data-parallel run trains one rank per \
             process (set ranks = {processes}, or run it in one process)",
            spec.ranks
        );
    }
    match (backend, spec.device) {
        (Backend::Mpi, DeviceKind::Cuda) => {
            bail!("device = \"cuda\": the MPI backend trains on the CPU (device = \"cpu\"; --backend nccl for GPUs)")
        }
        (Backend::Nccl, DeviceKind::Cpu) => {
            bail!("device = \"cpu\": the NCCL backend trains on GPUs (device = \"cuda\"; --backend mpi for the CPU)")
        }
        _ => Ok(()),
    }
}

/// `mpirun` on the PATH.
fn mpirun() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("mpirun")).find(|p| p.is_file()).context(
        "mpirun is not on the PATH: install OpenMPI (Debian: openmpi-bin libopenmpi-dev; `just test-deps` does)",
    )
}

/// The `mpirun` command line that trains `spec_file` into `out` with `processes` processes of
/// the program `exe`.
pub fn command(exe: &Path, spec_file: &Path, out: &Path, processes: u64, opts: &LaunchOptions) -> Result<Command> {
    let mut cmd = mpirun_command(processes)?;
    cmd.arg(exe);
    add_train_args(&mut cmd, spec_file, out, Backend::Mpi, opts);
    Ok(cmd)
}

/// Every process's `train SPEC --out DIR --data-parallel BACKEND [--resume | --auto]
/// [--pause-after N] [--progress-lines]`.
fn add_train_args(cmd: &mut Command, spec_file: &Path, out: &Path, backend: Backend, opts: &LaunchOptions) {
    cmd.arg("train").arg(spec_file).arg("--out").arg(out).args(["--data-parallel", backend.name()]);
    if opts.resume {
        cmd.arg("--resume");
    }
    if opts.auto {
        cmd.arg("--auto");
    }
    if opts.progress_lines {
        cmd.arg("--progress-lines");
    }
    if let Some(n) = opts.pause_after {
        cmd.args(["--pause-after", &n.to_string()]);
    }
}

/// `mpirun` starting `processes` processes (the program and its arguments to be added).
pub fn mpirun_command(processes: u64) -> Result<Command> {
    let mut cmd = Command::new(mpirun()?);
    // Root in a container (CI): OpenMPI refuses root unless told; more processes than cores
    // are allowed (the tests' 2 processes on a 2-core machine with hyper-threads off).
    if is_root() {
        cmd.arg("--allow-run-as-root");
    }
    cmd.args(["--oversubscribe", "-n", &processes.to_string()]);
    let threads = std::env::var("RAYON_NUM_THREADS").ok().unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
        (cores / processes).max(1).to_string()
    });
    cmd.args(["-x", &format!("RAYON_NUM_THREADS={threads}")]);
    Ok(cmd)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// What a launch of `backend` needs of this build and machine, whatever the spec: the
/// backend compiled in, and `mpirun` for MPI.
pub fn preflight(backend: Backend) -> Result<()> {
    let built = match backend {
        Backend::Mpi => cfg!(feature = "mpi"),
        Backend::Nccl => cfg!(feature = "nccl"),
        Backend::SingleProcess => bail!("launch starts several processes: --backend mpi or nccl"),
    };
    if !built {
        bail!(
            "this build has no {} backend: build paper-repro with --features {} (`just train-dp` builds mpi)",
            backend.name(),
            backend.name()
        );
    }
    if backend == Backend::Mpi {
        mpirun()?;
    }
    Ok(())
}

/// Run it and wait: Ok when every process finished.
pub fn run(
    spec: &RunSpec,
    spec_file: &Path,
    out: &Path,
    processes: u64,
    backend: Backend,
    opts: &LaunchOptions,
) -> Result<()> {
    preflight(backend)?;
    check_spec(spec, processes, backend)?;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let status = match backend {
        Backend::Mpi => command(&exe, spec_file, out, processes, opts)?.status().context("cannot start mpirun")?,
        _ => run_gpu_processes(&exe, spec_file, out, processes, opts)?,
    };
    if status.code() == Some(i32::from(crate::reproduce::DIVERGED_EXIT)) {
        // Rank 0 recorded it: a result, with the exit code of a one-process divergence.
        let failure = crate::run::RunDir::new(out).read_failure()?;
        let update = failure.as_ref().and_then(|f| f.diverged_at).unwrap_or(0);
        return Err(Diverged { update, what: "the data-parallel run diverged (see failed.json)".into() }.into());
    }
    if !status.success() {
        bail!(
            "the data-parallel run of {processes} processes into {} failed ({status}); the lines above name the rank \
             that failed first; its last complete checkpoint is kept: continue with --resume",
            out.display()
        );
    }
    Ok(())
}

/// NCCL has no launcher: start one process per GPU here (process r sees only GPU r: the r-th
/// entry of the caller's CUDA_VISIBLE_DEVICES, else device r) and wait for them. The first to
/// fail ends the others, and is named.
fn run_gpu_processes(
    exe: &Path,
    spec_file: &Path,
    out: &Path,
    processes: u64,
    opts: &LaunchOptions,
) -> Result<std::process::ExitStatus> {
    let visible: Vec<String> = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|d| d.trim().to_string()).collect(),
        _ => (0..processes).map(|r| r.to_string()).collect(),
    };
    if (visible.len() as u64) < processes {
        bail!("{processes} processes need {processes} GPUs; CUDA_VISIBLE_DEVICES names {}", visible.len());
    }
    let job = format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos()
    );
    let mut commands = Vec::new();
    for rank in 0..processes {
        let mut cmd = Command::new(exe);
        add_train_args(&mut cmd, spec_file, out, Backend::Nccl, opts);
        cmd.env("MADA_NCCL_RANK", rank.to_string())
            .env("MADA_NCCL_WORLD", processes.to_string())
            .env("MADA_NCCL_JOB", &job)
            .env("CUDA_VISIBLE_DEVICES", &visible[rank as usize]);
        commands.push(cmd);
    }
    run_ranks(commands)
}

/// Start one process per rank and wait for all of them. The first to fail ends the others
/// (killed, then reaped) and is named on standard error; its status is returned. Otherwise the
/// status of rank 0, once every process has succeeded.
fn run_ranks(commands: Vec<Command>) -> Result<std::process::ExitStatus> {
    let mut children = Vec::new();
    for (rank, mut cmd) in commands.into_iter().enumerate() {
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                for mut c in children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e).with_context(|| format!("cannot start the process of rank {rank}"));
            }
        }
    }
    let mut done = vec![None; children.len()];
    loop {
        for rank in 0..children.len() {
            if done[rank].is_some() {
                continue;
            }
            if let Some(status) = children[rank].try_wait()? {
                done[rank] = Some(status);
                if !status.success() {
                    eprintln!("rank {rank} failed ({status}); ending the other processes");
                    for (other, c) in children.iter_mut().enumerate() {
                        if done[other].is_none() {
                            let _ = c.kill();
                            let _ = c.wait();
                        }
                    }
                    return Ok(status);
                }
            }
        }
        if done.iter().all(Option::is_some) {
            return Ok(done[0].expect("rank 0 is done"));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn the_first_rank_to_fail_ends_the_others_and_its_status_is_returned() {
        let t = std::time::Instant::now();
        let status = run_ranks(vec![sh("sleep 30"), sh("sleep 0.2; exit 7"), sh("sleep 30")]).unwrap();
        assert_eq!(status.code(), Some(7));
        assert!(t.elapsed().as_secs() < 10, "the sleeping ranks were ended");
        let status = run_ranks(vec![sh("sleep 0.1"), sh("true")]).unwrap();
        assert!(status.success());
    }

    #[test]
    fn a_spec_that_does_not_fit_the_backend_or_the_world_is_refused() {
        use crate::models::gpt::GptConfig;
        use crate::run::spec::{ClipMode, Precision, Schedule, Task, TextData};
        let mut spec = RunSpec {
            label: "x".into(),
            task: Task::Lm {
                data: TextData { dir: "d".into() },
                model: GptConfig {
                    block_size: 8,
                    vocab_size: 8,
                    n_layer: 1,
                    n_head: 1,
                    n_embd: 8,
                    dropout: 0.0,
                    bias: false,
                },
                init_from: None,
                init_from_hf: false,
                eval_chunks: 1,
                eval_batch: 1,
            },
            optimizer: serde_json::from_str(r#"{"name": "adam"}"#).unwrap(),
            schedule: Schedule { lr: 1e-3, min_lr: 1e-4, warmup: 0, decay_until: 0, in_micro_steps: false },
            updates: 2,
            batch_size: 2,
            grad_accum: 2,
            ranks: 2,
            weight_decay: 0.0,
            grad_clip: 1.0,
            clip_mode: ClipMode::Global,
            seed: 1,
            eval_interval: 1,
            checkpoint_interval: 1,
            device: DeviceKind::Cpu,
            precision: Precision::Fp32,
        };
        check_spec(&spec, 2, Backend::Mpi).unwrap();
        assert!(check_spec(&spec, 4, Backend::Mpi).unwrap_err().to_string().contains("ranks = 2 but 4 processes"));
        assert!(check_spec(&spec, 2, Backend::Nccl).unwrap_err().to_string().contains("NCCL backend trains on GPUs"));
        spec.device = DeviceKind::Cuda;
        assert!(check_spec(&spec, 2, Backend::Mpi).unwrap_err().to_string().contains("MPI backend trains on the CPU"));
        check_spec(&spec, 2, Backend::Nccl).unwrap();
    }
}
