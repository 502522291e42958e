//! What the reload watcher and certificate rotation read of the files they
//! watch. Every poll asks each file's metadata (following symlinks, as a
//! ConfigMap or Secret mount needs) and reads and hashes a file only when
//! its metadata changed since it was last hashed: a poll of an unchanged
//! config with thousands of policy files reads none of them.
//!
//! The metadata compared is the device, inode, size and the modification
//! and status-change times. A write always moves the status-change time,
//! which no tool can set back, and a symlink or rename swap brings another
//! inode. The kernel keeps those times at the granularity of its clock
//! tick, so two writes a few milliseconds apart may leave the same stamp:
//! a file changed within the last [`RACY`] is read every time (as git
//! treats its "racily clean" entries), and only an older one is trusted
//! by its stamp. A changed file is never taken for the same.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A file's identity and times, as `stat` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The most files remembered: far more than any config names. Past it the
/// memory starts over (each file is then read once more).
const MAX_FILES: usize = 16_384;

fn stamps() -> &'static Mutex<HashMap<PathBuf, (Stamp, u64)>> {
    static STAMPS: OnceLock<Mutex<HashMap<PathBuf, (Stamp, u64)>>> = OnceLock::new();
    STAMPS.get_or_init(Default::default)
}

/// How long after its last change a file's stamp is not trusted.
const RACY: Duration = Duration::from_secs(2);

/// A hash of `path`'s contents, `None` when it cannot be read; read only
/// when its metadata changed since the last call for it.
pub fn content_hash(path: &Path) -> Option<u64> {
    content_hash_at(path, SystemTime::now())
}

fn content_hash_at(path: &Path, now: SystemTime) -> Option<u64> {
    let stamp = Stamp::of(path)?;
    let mut seen = stamps().lock().unwrap_or_else(|p| p.into_inner());
    if let Some((known, hash)) = seen.get(path) {
        if *known == stamp {
            return Some(*hash);
        }
    }
    let bytes = std::fs::read(path).ok()?;
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    let hash = h.finish();
    // Read after the stamp: a write in between changes the stamp again,
    // and the next call reads the file anew.
    if seen.len() >= MAX_FILES {
        seen.clear();
    }
    let changed = UNIX_EPOCH
        + Duration::new(
            u64::try_from(stamp.ctime.0).unwrap_or(0),
            u32::try_from(stamp.ctime.1).unwrap_or(0),
        );
    if now.duration_since(changed).is_ok_and(|age| age > RACY) {
        seen.insert(path.to_path_buf(), (stamp, hash));
    } else {
        // Changed just now: a write in the same clock tick would leave
        // this very stamp, so it is read again next time.
        seen.remove(path);
    }
    Some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(path: &Path) -> Option<u64> {
        let seen = stamps().lock().expect("lock");
        seen.get(path).map(|(_, hash)| *hash)
    }

    #[test]
    fn a_file_is_read_again_only_when_its_metadata_changes() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("policy.cedar");
        std::fs::write(&path, "permit(principal, action, resource);").expect("write");
        // Just written: hashed, not yet trusted by its stamp.
        let first = content_hash(&path).expect("readable");
        assert_eq!(cached(&path), None, "racily clean");
        // As a poll would see it later: trusted from then on.
        let later = SystemTime::now() + 2 * RACY;
        assert_eq!(content_hash_at(&path, later), Some(first));
        assert_eq!(cached(&path), Some(first));
        // Rewritten: the stamp moves (here the size too), so it is read
        // again.
        std::fs::write(&path, "forbid(principal, action, resource); ").expect("write");
        let second = content_hash_at(&path, later).expect("readable");
        assert_ne!(second, first);
        // Swapped by rename, as a ConfigMap update does through symlinks.
        let next = dir.path().join("next.cedar");
        std::fs::write(&next, "permit(principal, action, resource);").expect("write");
        std::fs::rename(&next, &path).expect("swap");
        assert_eq!(content_hash_at(&path, later), Some(first));
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(content_hash(&path), None, "gone");
    }

    #[test]
    fn a_file_rewritten_within_a_clock_tick_is_not_missed() {
        // Two writes of the same length in the same tick leave the same
        // stamp; a fresh file is read every time, so the second is seen.
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("registry.yaml");
        std::fs::write(&path, "agents: [a]").expect("write");
        let first = content_hash(&path).expect("readable");
        std::fs::write(&path, "agents: [b]").expect("write");
        let second = content_hash(&path).expect("readable");
        assert_ne!(first, second);
    }
}
