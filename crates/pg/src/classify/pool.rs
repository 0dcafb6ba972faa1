//! The classifier's worker threads: libpg_query and serde recurse on nested trees, so deep
//! statements are parsed on threads with large stacks, started once and shared.

use super::{classify_here, ClassifyError, Statement};

pub(super) fn submit(sql: &str, schema: &str, reply: Reply) -> Result<(), ClassifyError> {
    pool()
        .lock()
        .map_err(|_| ClassifyError::Internal("classifier pool unavailable".into()))?
        .send(Job {
            sql: sql.to_owned(),
            schema: schema.to_owned(),
            reply,
        })
        .map_err(|_| ClassifyError::Internal("classifier pool stopped".into()))
}

type Outcome = Result<Vec<Statement>, ClassifyError>;

/// Where a worker sends its answer: a blocking caller or an async one.
pub(super) enum Reply {
    Blocking(std::sync::mpsc::Sender<Outcome>),
    Async(tokio::sync::oneshot::Sender<Outcome>),
}

struct Job {
    sql: String,
    schema: String,
    reply: Reply,
}

/// Worker threads with large stacks (libpg_query and serde recurse on nested trees), started
/// once: spawning a 64 MiB-stack thread per statement cost more than the parse itself.
fn pool() -> &'static std::sync::Mutex<std::sync::mpsc::Sender<Job>> {
    static POOL: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = std::sync::Arc::new(std::sync::Mutex::new(queue));
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(2, 8);
        for i in 0..workers {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("capgate-sql-classify-{i}"))
                .stack_size(64 << 20)
                .spawn(move || loop {
                    let job = match queue.lock() {
                        Ok(queue) => queue.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    let outcome = classify_here(&job.sql, &job.schema);
                    match job.reply {
                        Reply::Blocking(reply) => drop(reply.send(outcome)),
                        Reply::Async(reply) => drop(reply.send(outcome)),
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a classifier worker");
            }
        }
        std::sync::Mutex::new(jobs)
    })
}
