//! Confines threads to chosen CPUs (`engine.worker_cpus`, `http.cpus`).
//!
//! On a machine with few cores, a long worker step (a recommendations refresh, a burst of
//! events) takes every core for tens of milliseconds, and reads wait behind it. A nice value
//! only shortens that wait; giving the HTTP threads a CPU the workers never run on removes it.
//! Linux only: elsewhere the keys are accepted and a warning is logged.

use anyhow::{bail, Result};

/// The CPUs this process may run on, ascending (`None`: not known on this system).
pub fn allowed() -> Option<Vec<usize>> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `set` is a plain bit set owned by this frame; pid 0 is the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return None;
            }
            Some(
                (0..libc::CPU_SETSIZE as usize)
                    .filter(|&c| libc::CPU_ISSET(c, &set))
                    .collect(),
            )
        }
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Checks at start that every CPU `key` names is one this process may run on, so that a typo
/// fails with a clear message instead of a warning per thread.
pub fn check(key: &str, cpus: &[usize]) -> Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let Some(allowed) = allowed() else {
        tracing::warn!("{key} is only applied on Linux; ignored");
        return Ok(());
    };
    if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
        bail!(
            "{key} names CPU {c}, but this process may only run on CPUs {}",
            list(&allowed)
        );
    }
    Ok(())
}

/// Confines the calling thread to `cpus` (empty: leaves it alone). A failure is logged, never
/// fatal: the thread then runs where the OS puts it.
pub fn pin_current(cpus: &[usize], thread: &str) {
    if cpus.is_empty() {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `set` is a plain bit set owned by this frame; ids are below CPU_SETSIZE
        // (checked by the config); pid 0 is the calling thread.
        let done = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in cpus {
                libc::CPU_SET(c, &mut set);
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if done != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(thread, cpus = %list(cpus), "cannot pin the thread: {e}");
        }
    }
}

/// `0-3,6` style, as Linux prints CPU lists.
pub fn list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        while i + 1 < sorted.len() && sorted[i + 1] == sorted[i] + 1 {
            i += 1;
        }
        parts.push(if sorted[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", sorted[i])
        });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_read_as_linux_prints_them() {
        assert_eq!(list(&[3, 0, 1, 2, 6, 6]), "0-3,6");
        assert_eq!(list(&[5]), "5");
        assert_eq!(list(&[]), "");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_cpu_this_process_cannot_use_is_refused_at_start() {
        let allowed = allowed().expect("Linux reports the affinity mask");
        assert!(!allowed.is_empty());
        check("engine.worker_cpus", &allowed).unwrap();
        let e = check("engine.worker_cpus", &[1023])
            .unwrap_err()
            .to_string();
        assert!(e.contains("engine.worker_cpus names CPU 1023"), "{e}");
    }
}
