//! Imports in the background, so that a sync never waits for a download: it asks for what the
//! node needs and reads where each import stands.
//!
//! One job per requester, digest and source: a namespace's failing source (a bad URL, a wrong
//! token) fails only its own DiscImages, never another namespace's import of the same digest,
//! nor another source of the same namespace; and a corrected source starts a new job at once.

use std::collections::BTreeMap;
use std::sync::Arc;

// Cannot be poisoned: a panicking import must not make every image look failed.
use parking_lot::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::metrics::{ErrorKind, Metrics};

use super::{ImportError, ImportRequest, Importer, Progress, Requester, StoredImage, progress};

/// Where an image stands on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageState {
    Ready(StoredImage),
    InProgress(Progress),
    /// The import failed. `retry_at` is set when trying again may help (a network fault).
    Failed {
        message: String,
        retry_at: Option<Instant>,
    },
}

/// Who asks, for which digest, from which source (a fingerprint: header values are secrets).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct JobKey {
    requester: Requester,
    sha256: String,
    source: String,
}

impl JobKey {
    fn of(request: &ImportRequest) -> Self {
        Self {
            requester: request.requester.clone(),
            sha256: request.sha256.clone(),
            source: request.source.fingerprint(),
        }
    }
}

enum Job {
    Running(watch::Receiver<Progress>),
    Done(Result<StoredImage, (String, Option<Instant>)>),
}

pub struct ImageManager {
    importer: Arc<Importer>,
    jobs: Arc<Mutex<BTreeMap<JobKey, Job>>>,
    /// Woken whenever an import finishes, so the sync loop can run again.
    finished: Arc<Notify>,
    retry_delay: Duration,
    metrics: Arc<Metrics>,
}

impl ImageManager {
    pub fn new(importer: Arc<Importer>, metrics: Arc<Metrics>) -> Self {
        Self {
            importer,
            jobs: Arc::default(),
            finished: Arc::new(Notify::new()),
            retry_delay: Duration::from_secs(60),
            metrics,
        }
    }

    pub fn importer(&self) -> &Importer {
        &self.importer
    }

    /// Notified each time an import ends.
    pub fn finished(&self) -> Arc<Notify> {
        Arc::clone(&self.finished)
    }

    /// Where the image stands; starts (or restarts, after a transient failure) its import.
    pub fn ensure(&self, request: &ImportRequest) -> ImageState {
        let mut jobs = self.jobs.lock();
        let key = JobKey::of(request);
        match jobs.get(&key) {
            Some(Job::Running(progress)) => {
                return ImageState::InProgress(progress.borrow().clone());
            }
            Some(Job::Done(Err((message, retry_at))))
                if retry_at.is_none_or(|at| Instant::now() < at) =>
            {
                return ImageState::Failed {
                    message: message.clone(),
                    retry_at: *retry_at,
                };
            }
            _ => {}
        }
        // Already stored for this namespace (by this job, an earlier run, another of its
        // DiscImages, or an operator's `discus image fetch --namespace`): no job needed. Asked of
        // the store each time, never of a finished job: garbage collection may have removed the
        // image, or taken back the namespace's entitlement.
        if let Ok(Some(stored)) = self.importer.lookup(request) {
            jobs.insert(key, Job::Done(Ok(stored.clone())));
            return ImageState::Ready(stored);
        }
        let (mut reporter, receiver) = progress::channel();
        let initial = receiver.borrow().clone();
        jobs.insert(key.clone(), Job::Running(receiver));
        let (importer, jobs, finished, request, metrics) = (
            Arc::clone(&self.importer),
            Arc::clone(&self.jobs),
            Arc::clone(&self.finished),
            request.clone(),
            Arc::clone(&self.metrics),
        );
        let retry_delay = self.retry_delay;
        tokio::spawn(async move {
            let result = importer.import(&request, &mut reporter).await;
            let done = result.map_err(|error: ImportError| {
                tracing::warn!(sha256 = %request.sha256, requester = ?request.requester, %error, "image import failed");
                metrics.error(ErrorKind::Import);
                let retry_at = error.is_transient().then(|| Instant::now() + retry_delay);
                (error.to_string(), retry_at)
            });
            jobs.lock().insert(key, Job::Done(done));
            finished.notify_one();
        });
        ImageState::InProgress(initial)
    }

    /// Whether any import is still running.
    pub fn busy(&self) -> bool {
        self.jobs
            .lock()
            .values()
            .any(|j| matches!(j, Job::Running(_)))
    }
}
