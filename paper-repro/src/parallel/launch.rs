//! `paper-repro launch --processes N SPEC --out DIR`: one command that starts N processes of
//! this program under `mpirun`, each training one rank of the spec's run.
//!
//! Everything that can be known before the processes start is checked here, with one error:
//! the spec (its `ranks` must be N, its device the CPU), this build's MPI support, `mpirun` on
//! the PATH. Each process gets `RAYON_NUM_THREADS` = cores / N (unless the caller set it), so the
//! N processes share the machine's cores instead of each taking all of them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::run::spec::{DeviceKind, RunSpec};
use crate::run::Diverged;

/// What `launch` passes through to every process's `train`.
#[derive(Clone, Debug, Default)]
pub struct LaunchOptions {
    pub resume: bool,
    pub pause_after: Option<u64>,
}

/// The checks a data-parallel run of `processes` processes must pass before any starts (also
/// made by each process, for runs started with `mpirun` directly).
pub fn check_spec(spec: &RunSpec, processes: u64) -> Result<()> {
    spec.validate()?;
    if spec.ranks != processes {
        bail!(
            "the spec's ranks = {} but {processes} processes were asked for: a data-parallel run trains one rank per \
             process (set ranks = {processes}, or run it in one process)",
            spec.ranks
        );
    }
    if spec.device != DeviceKind::Cpu {
        bail!("device = {:?}: the MPI backend trains on the CPU (device = \"cpu\")", spec.device);
    }
    Ok(())
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
    cmd.arg(exe).arg("train").arg(spec_file).arg("--out").arg(out).args(["--data-parallel", "mpi"]);
    if opts.resume {
        cmd.arg("--resume");
    }
    if let Some(n) = opts.pause_after {
        cmd.args(["--pause-after", &n.to_string()]);
    }
    Ok(cmd)
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

/// Run it and wait: Ok when every process finished.
pub fn run(spec: &RunSpec, spec_file: &Path, out: &Path, processes: u64, opts: &LaunchOptions) -> Result<()> {
    if !cfg!(feature = "mpi") {
        bail!("this build has no MPI backend: build paper-repro with --features mpi (`just train-dp` does)");
    }
    check_spec(spec, processes)?;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let status = command(&exe, spec_file, out, processes, opts)?.status().context("cannot start mpirun")?;
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
