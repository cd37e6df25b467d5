//! The default worker id: unique per process, so that two processes never share one by
//! accident (every container's first process is pid 1) and take each other's leases every round.

/// `<host>-<pid>-<8 random hex digits>`: the host name says where a worker runs, the process id
/// which process, and the random part keeps two processes apart when the others do not (pid 1
/// in every container, a host name shared by clones of one image).
pub(crate) fn default_worker_id() -> String {
    format!(
        "{}-{}-{:08x}",
        host_name(),
        std::process::id(),
        rand::random::<u32>()
    )
}

/// The host name, kept to characters that read well in logs and lease tables; `worker` if
/// there is none to read.
fn host_name() -> String {
    let raw = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(63)
        .collect();
    if name.is_empty() {
        "worker".to_owned()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_default_ids_in_one_process_differ_and_name_the_host_and_process() {
        let (a, b) = (default_worker_id(), default_worker_id());
        assert_ne!(a, b, "two processes with one pid (containers) still differ");
        let pid = format!("-{}-", std::process::id());
        assert!(a.contains(&pid) && a.starts_with(&host_name()), "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "{a}"
        );
    }
}
