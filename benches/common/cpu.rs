//! CPU time as Linux counts it, for the benches' per-event costs.

use std::time::Duration;

/// The CPU time (user and system) `process` (a pid, or `self`) has used so
/// far: the sum over its threads' `schedstat`, in nanoseconds. Threads that
/// have ended are not counted; a runtime's workers outlive every run.
pub(crate) fn cpu_of(process: &str) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{process}/task")) else {
        return Duration::ZERO;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_nanos)
        .sum()
}
