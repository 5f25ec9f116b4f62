//! Imports in the background, so that a sync never waits for a download: it asks for what the
//! node needs and reads where each import stands.
//!
//! A stored image is served only once its bytes were read since the start (see `scrub`): the
//! check runs as a job like an import, in phase `Verifying`.
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

use super::scrub::{Checked, Scrub, ScrubConfig};
use super::{
    ImportError, ImportRequest, Importer, Phase, Progress, ProgressReporter, Requester,
    StoredImage, progress,
};

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
    Running(Running),
    Done(Outcome),
}

struct Running {
    progress: watch::Receiver<Progress>,
    task: tokio::task::AbortHandle,
    /// An upload: it waits on a client for as long as it runs.
    upload: bool,
}

pub struct ImageManager {
    importer: Arc<Importer>,
    jobs: Arc<Mutex<BTreeMap<JobKey, Job>>>,
    /// Woken whenever an import or a check finishes, or the scrub finds a file rotten, so the
    /// sync loop can run again.
    finished: Arc<Notify>,
    retry_delay: Duration,
    metrics: Arc<Metrics>,
    scrub: Arc<Scrub>,
}

/// How a job ended: the image, or why not and when trying again may help.
type Outcome = Result<StoredImage, (String, Option<Instant>)>;

impl ImageManager {
    pub fn new(importer: Arc<Importer>, metrics: Arc<Metrics>, scrub: ScrubConfig) -> Self {
        let finished = Arc::new(Notify::new());
        let scrub = Arc::new(Scrub::new(
            importer.store().clone(),
            scrub,
            Arc::clone(&finished),
            Arc::clone(&metrics),
        ));
        Self {
            importer,
            jobs: Arc::default(),
            finished,
            retry_delay: Duration::from_secs(60),
            metrics,
            scrub,
        }
    }

    pub fn importer(&self) -> &Importer {
        &self.importer
    }

    /// The node's scrub: run its background loop, tell it what was served at the start.
    pub fn scrub(&self) -> &Arc<Scrub> {
        &self.scrub
    }

    /// Notified each time an import ends.
    pub fn finished(&self) -> Arc<Notify> {
        Arc::clone(&self.finished)
    }

    /// The stored image the request may have right away, and may be served now: its bytes were
    /// checked since the start, or it was already served then (see `scrub`).
    pub fn stored(&self, request: &ImportRequest) -> Result<Option<StoredImage>, ImportError> {
        Ok(self
            .importer
            .lookup(request)?
            .filter(|stored| self.scrub.may_serve(&stored.served_sha256)))
    }

    /// What to tell while the request's stored image, found rotten, is not whole again.
    pub fn rotten(&self, request: &ImportRequest) -> Option<String> {
        let served = self.importer.store().served_digest(&request.sha256)?;
        self.scrub.rotten(&served)
    }

    /// Where the image stands; starts (or restarts, after a transient failure) its import, or
    /// the check of its stored bytes before they are first served after a start.
    pub fn ensure(&self, request: &ImportRequest) -> ImageState {
        let mut jobs = self.jobs.lock();
        let key = JobKey::of(request);
        match jobs.get(&key) {
            Some(Job::Running(running)) => {
                return ImageState::InProgress(running.progress.borrow().clone());
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
        // DiscImages, or an operator's `discus image fetch --namespace`): no import needed. Asked
        // of the store each time, never of a finished job: garbage collection may have removed
        // the image, the scrub found it rotten, or the namespace's entitlement was taken back.
        match self.importer.lookup(request) {
            Ok(Some(stored)) if self.scrub.may_serve(&stored.served_sha256) => {
                jobs.insert(key, Job::Done(Ok(stored.clone())));
                ImageState::Ready(stored)
            }
            Ok(Some(stored)) => self.start(&mut jobs, key, false, |reporter| {
                self.check(stored, reporter)
            }),
            Ok(None) | Err(_) => {
                let upload = matches!(request.source, super::Source::Upload { .. });
                self.start(&mut jobs, key, upload, |reporter| {
                    self.import(request, reporter)
                })
            }
        }
    }

    /// Runs a job in the background; its outcome lands in `jobs`, and the sync loop is woken.
    fn start<F>(
        &self,
        jobs: &mut BTreeMap<JobKey, Job>,
        key: JobKey,
        upload: bool,
        job: impl FnOnce(ProgressReporter) -> F,
    ) -> ImageState
    where
        F: std::future::Future<Output = Outcome> + Send + 'static,
    {
        let (reporter, receiver) = progress::channel();
        let initial = receiver.borrow().clone();
        let (shared, finished, job) = (
            Arc::clone(&self.jobs),
            Arc::clone(&self.finished),
            job(reporter),
        );
        let done = key.clone();
        // The caller holds the jobs' lock: the task cannot record its outcome before it is
        // recorded as running.
        let task = tokio::spawn(async move {
            let outcome = job.await;
            shared.lock().insert(done, Job::Done(outcome));
            finished.notify_one();
        });
        let running = Running {
            progress: receiver,
            task: task.abort_handle(),
            upload,
        };
        jobs.insert(key, Job::Running(running));
        ImageState::InProgress(initial)
    }

    /// Ends the uploads no request asks for any more (their DiscImage is gone, names another
    /// digest, or is not needed on this node): an upload waits on a client for as long as it
    /// runs, and nothing may be received for an image nobody asks for. What it received so far
    /// stays until garbage collection, so that a request that comes back resumes it.
    pub fn end_uploads_except<'a>(&self, requests: impl IntoIterator<Item = &'a ImportRequest>) {
        let asked: std::collections::BTreeSet<JobKey> =
            requests.into_iter().map(JobKey::of).collect();
        self.jobs.lock().retain(|key, job| match job {
            // Once its bytes were verified, an upload is an import like any other.
            Job::Running(running)
                if running.upload
                    && !asked.contains(key)
                    && matches!(
                        running.progress.borrow().phase,
                        Phase::Pending | Phase::Uploading
                    ) =>
            {
                running.task.abort();
                false
            }
            _ => true,
        });
    }

    /// Fetches, verifies and stores the image.
    fn import(
        &self,
        request: &ImportRequest,
        mut reporter: ProgressReporter,
    ) -> impl std::future::Future<Output = Outcome> + Send + 'static {
        let (importer, request, metrics) = (
            Arc::clone(&self.importer),
            request.clone(),
            Arc::clone(&self.metrics),
        );
        let retry_delay = self.retry_delay;
        async move {
            let result = importer.import(&request, &mut reporter).await;
            result.map_err(|error: ImportError| {
                tracing::warn!(sha256 = %request.sha256, requester = ?request.requester, %error, "image import failed");
                metrics.error(ErrorKind::Import);
                let retry_at = error.is_transient().then(|| Instant::now() + retry_delay);
                (error.to_string(), retry_at)
            })
        }
    }

    /// Reads a stored image at full speed before it is first served after a start. A rotten
    /// one is gone afterwards, and the next `ensure` imports it again at once.
    fn check(
        &self,
        stored: StoredImage,
        mut reporter: ProgressReporter,
    ) -> impl std::future::Future<Output = Outcome> + Send + 'static {
        let scrub = Arc::clone(&self.scrub);
        let retry_delay = self.retry_delay;
        async move {
            let served = stored.served_sha256.clone();
            let checked = tokio::task::spawn_blocking(move || {
                scrub.check(&served, false, &mut |done, size| {
                    reporter.update(Phase::Verifying, done, Some(size));
                })
            })
            .await;
            match checked {
                Ok(Ok(Checked::Whole)) => Ok(stored),
                Ok(Ok(Checked::Rotten { .. } | Checked::Gone)) => Err((
                    format!(
                        "the stored image {} was not whole when read again; fetching it again",
                        stored.served_sha256
                    ),
                    Some(Instant::now()),
                )),
                Ok(Err(error)) => Err((error.to_string(), Some(Instant::now() + retry_delay))),
                Err(error) => Err((error.to_string(), Some(Instant::now() + retry_delay))),
            }
        }
    }

    /// Whether any import is still running (an upload waits on a client: it does not count).
    pub fn busy(&self) -> bool {
        self.jobs
            .lock()
            .values()
            .any(|j| matches!(j, Job::Running(running) if !running.upload))
    }
}
