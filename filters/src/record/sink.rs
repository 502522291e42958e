//! The audit log's writer: one JSON line per request, written on a thread
//! of its own from a bounded queue.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus::IntCounter;

use super::AuditRecord;

/// Writes audit lines on a thread of its own, so a slow disk or a full pipe
/// never holds up a request. The queue is bounded: past it, lines are
/// dropped and counted, never buffered without limit.
///
/// Lines are serialized straight into one shared buffer, which the writer
/// swaps for its own empty one: no allocation per line, and no buffer is
/// freed on a thread other than the one that grew it (an allocation per
/// line, freed by the writer, cost CPU and megabytes of pages the
/// allocator was slow to take back).
pub struct AuditSink {
    queue: Arc<AuditQueue>,
    writer: std::thread::Thread,
    /// Hears from the writer when it has written its last batch.
    done: Mutex<mpsc::Receiver<()>>,
}

struct AuditQueue {
    pending: Mutex<PendingLines>,
    max_queue: usize,
    dropped: IntCounter,
    closing: AtomicBool,
}

/// Lines waiting for the writer, each ending in `\n`.
#[derive(Default)]
struct PendingLines {
    bytes: Vec<u8>,
    lines: usize,
    /// The writer has taken its last batch: a line now would never be
    /// written, and is counted as dropped instead.
    finished: bool,
}

/// Bytes the queue holds at most, whatever `max_queue` says: a line's
/// size is the caller's to choose (its path, for one), so a count alone
/// would not bound memory.
const MAX_QUEUE_BYTES: usize = 32 << 20;

/// How often the writer wakes to write what is queued. Queuing a line
/// never wakes a thread (a wake-up per request cost about a tenth of the
/// proxy's CPU).
const AUDIT_FLUSH_EVERY: Duration = Duration::from_millis(20);

impl AuditSink {
    /// Starts the writer for `output` (`stdout`, `stderr` or a file path,
    /// appended to), holding at most `max_queue` lines.
    pub fn start(
        output: &str,
        max_queue: usize,
        dropped: IntCounter,
    ) -> std::io::Result<(AuditSink, JoinHandle<()>)> {
        let writer: Box<dyn Write + Send> = match output {
            "stdout" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let queue = Arc::new(AuditQueue {
            pending: Mutex::new(PendingLines::default()),
            max_queue,
            dropped,
            closing: AtomicBool::new(false),
        });
        let (done, finished) = mpsc::channel();
        let q = queue.clone();
        let handle = std::thread::Builder::new()
            .name("tether-audit".into())
            .spawn(move || {
                write_lines(&q, writer);
                let _ = done.send(());
            })?;
        let sink = AuditSink {
            queue,
            writer: handle.thread().clone(),
            done: Mutex::new(finished),
        };
        Ok((sink, handle))
    }

    /// Writes what is queued and stops the writer, waiting up to `timeout`:
    /// at shutdown, so no line is lost with the process.
    pub fn close(&self, timeout: Duration) {
        self.stop();
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        // Finished, timed out, or gone (a writer that ended without a
        // word): nothing more to wait for in any case.
        let _ = done.recv_timeout(timeout);
    }

    fn stop(&self) {
        self.queue.closing.store(true, Ordering::Release);
        self.writer.unpark();
    }

    /// Queues one record.
    pub fn write(&self, record: &AuditRecord<'_>) {
        let queue = &self.queue;
        let mut pending = queue.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.finished
            || pending.lines >= queue.max_queue
            || pending.bytes.len() >= MAX_QUEUE_BYTES
        {
            drop(pending);
            queue.dropped.inc();
            return;
        }
        record.write_json(&mut pending.bytes);
        pending.bytes.push(b'\n');
        pending.lines += 1;
    }
}

impl Drop for AuditSink {
    /// The writer writes what is left and ends.
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_lines(queue: &AuditQueue, writer: Box<dyn Write + Send>) {
    let mut out = writer;
    let mut batch = Vec::new();
    // Wake on a clock, take everything queued, write it in one call.
    loop {
        std::thread::park_timeout(AUDIT_FLUSH_EVERY);
        // Read before taking the lines, so none queued before closing is
        // left behind.
        let closing = queue.closing.load(Ordering::Acquire);
        let lines = {
            let mut pending = queue.pending.lock().unwrap_or_else(|p| p.into_inner());
            // The queue gets the writer's emptied buffer, capacity kept.
            std::mem::swap(&mut pending.bytes, &mut batch);
            pending.finished = closing;
            std::mem::take(&mut pending.lines)
        };
        if !batch.is_empty() {
            if let Err(e) = out.write_all(&batch).and_then(|()| out.flush()) {
                // A full disk or a closed pipe loses the batch: counted
                // whole, as how much of it reached the output is unknown.
                queue.dropped.inc_by(lines as u64);
                log::error!("cannot write {lines} audit lines: {e}");
            }
        }
        batch.clear();
        if batch.capacity() > MAX_QUEUE_BYTES {
            // A burst of huge lines does not keep its buffer for good.
            batch = Vec::new();
        }
        if closing {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Metrics;
    use crate::testing;
    use crate::Reason;

    /// Sends `lines` records through a sink holding at most `max_queue`,
    /// closes it, and returns what reached the file and how many it
    /// counted as dropped.
    fn through_a_sink(name: &str, max_queue: usize, lines: usize) -> (String, u64) {
        let metrics = Metrics::new().expect("metrics");
        let path =
            std::env::temp_dir().join(format!("tether-audit-{name}-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let (sink, handle) = AuditSink::start(
            path.to_str().expect("utf-8"),
            max_queue,
            metrics.audit_dropped.clone(),
        )
        .expect("sink");
        let ctx = testing::ctx();
        for _ in 0..lines {
            sink.write(&AuditRecord::new(&ctx, "GET", Reason::NoRoute, 403, None));
        }
        drop(sink);
        handle.join().expect("writer");
        let text = std::fs::read_to_string(&path).expect("audit file");
        let _ = std::fs::remove_file(&path);
        (text, metrics.audit_dropped.get())
    }

    #[test]
    fn a_line_written_after_the_sink_closed_is_counted_not_lost() {
        let metrics = Metrics::new().expect("metrics");
        let (sink, handle) =
            AuditSink::start("stderr", 16, metrics.audit_dropped.clone()).expect("sink");
        sink.close(Duration::from_secs(5));
        handle.join().expect("writer");
        let ctx = testing::ctx();
        sink.write(&AuditRecord::new(&ctx, "GET", Reason::Aborted, 0, None));
        assert_eq!(metrics.audit_dropped.get(), 1);
    }

    #[test]
    fn the_sink_writes_lines_and_counts_what_it_drops() {
        let (text, dropped) = through_a_sink("some", 4, 3);
        // Room for all three: all written, none dropped.
        assert_eq!((text.lines().count(), dropped), (3, 0));
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("json line");
            assert_eq!(v["reason"], "no_route");
        }
    }

    #[test]
    fn lines_a_full_disk_refuses_are_counted_as_dropped() {
        // /dev/full takes the open and refuses every write (ENOSPC).
        let metrics = Metrics::new().expect("metrics");
        let (sink, handle) =
            AuditSink::start("/dev/full", 100, metrics.audit_dropped.clone()).expect("sink");
        let ctx = testing::ctx();
        for _ in 0..5 {
            sink.write(&AuditRecord::new(&ctx, "GET", Reason::NoRoute, 403, None));
        }
        drop(sink);
        handle.join().expect("writer");
        assert_eq!(metrics.audit_dropped.get(), 5);
    }

    #[test]
    fn the_queue_holds_a_bounded_number_of_bytes_whatever_the_lines_hold() {
        use std::os::fd::AsRawFd as _;
        // The output is a pipe nobody reads: the writer's first write
        // blocks once the pipe is full, and the queue is left to fill.
        let (reader, writer) = std::io::pipe().expect("pipe");
        let output = format!("/proc/self/fd/{}", writer.as_raw_fd());
        let metrics = Metrics::new().expect("metrics");
        let (sink, handle) =
            AuditSink::start(&output, 1_000_000, metrics.audit_dropped.clone()).expect("sink");
        drop(writer);
        let mut ctx = testing::ctx();
        let line = 1 << 20;
        let long = format!("/{}", "a".repeat(line));
        ctx.path = long.as_str().into();
        // The writer may hold one queue's worth when its write blocks.
        let lines = 2 * (MAX_QUEUE_BYTES / line) + 8;
        for _ in 0..lines {
            sink.write(&AuditRecord::new(&ctx, "GET", Reason::NoRoute, 403, None));
        }
        let held = sink.queue.pending.lock().expect("lock").bytes.len();
        assert!(held < MAX_QUEUE_BYTES + 2 * line, "{held} bytes held");
        assert!(
            metrics.audit_dropped.get() >= 8,
            "lines over the bound were refused"
        );
        // The reader goes: every write fails, and every line is counted,
        // those refused and those the writer could not write alike.
        drop(sink);
        drop(reader);
        handle.join().expect("writer");
        assert_eq!(metrics.audit_dropped.get(), lines as u64);
    }

    #[test]
    fn a_full_queue_drops_and_counts_every_line_it_cannot_hold() {
        // A queue with no room: whatever the writer's timing, every line
        // is dropped and counted, and nothing reaches the file.
        let (text, dropped) = through_a_sink("full", 0, 3);
        assert_eq!(dropped, 3);
        assert_eq!(text, "");
    }
}
