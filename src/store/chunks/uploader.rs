//! Uploads in the background: a backup's workers hand full packs to a
//! pool of threads that write them to the bucket, so that several requests
//! are in flight however few cores encode. The queue is bounded (memory
//! stays bounded); [`Uploader::flush`] waits for everything handed over
//! and reports the first failure, and the repository calls it before it
//! commits anything that names those chunks.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, Result};
use crate::store::backend::Backend;

/// What to do once an object is stored (record it in an index).
pub type Stored = Box<dyn FnOnce() -> Result<()> + Send>;

struct Job {
    key: String,
    body: Vec<u8>,
    stored: Stored,
}

#[derive(Default)]
struct State {
    pending: usize,
    failed: Option<Error>,
}

pub struct Uploader {
    tx: Mutex<Option<SyncSender<Job>>>,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl Uploader {
    /// `threads` requests in flight at once, `queued` bodies waiting for
    /// a thread at most.
    pub fn new(backend: Arc<dyn Backend>, threads: usize, queued: usize) -> Result<Self> {
        let (tx, rx) = sync_channel::<Job>(queued);
        let rx = Arc::new(Mutex::new(rx));
        let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
        for _ in 0..threads {
            let (backend, rx, state) = (backend.clone(), rx.clone(), state.clone());
            std::thread::Builder::new()
                .name("s3-upload".into())
                .spawn(move || work(backend.as_ref(), &rx, &state))
                .map_err(|e| Error::io("start an upload thread", e))?;
        }
        Ok(Uploader {
            tx: Mutex::new(Some(tx)),
            state,
        })
    }

    /// Queue a create-only write of `body` under `key`, then `stored`;
    /// waits while the queue is full. Fails at once if an earlier upload
    /// failed.
    pub fn send(&self, key: String, body: Vec<u8>, stored: Stored) -> Result<()> {
        {
            let mut st = self.state.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = &st.failed {
                return Err(Error::invalid(format!("an earlier upload failed: {e}")));
            }
            st.pending += 1;
        }
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let sent = tx.map(|tx| tx.send(Job { key, body, stored }).is_ok());
        if sent != Some(true) {
            self.done(Some(Error::invalid("the upload threads are gone")));
        }
        Ok(())
    }

    fn done(&self, failure: Option<Error>) {
        finish(&self.state, failure);
    }

    /// Wait until everything sent is stored; the first failure, if any
    /// (which stays: nothing sent since may be committed either).
    pub fn flush(&self) -> Result<()> {
        let (lock, cv) = &*self.state;
        let st = cv
            .wait_while(lock.lock().unwrap_or_else(|e| e.into_inner()), |s| {
                s.pending > 0
            })
            .unwrap_or_else(|e| e.into_inner());
        match &st.failed {
            Some(e) => Err(Error::invalid(format!("uploading chunks failed: {e}"))),
            None => Ok(()),
        }
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        // Closing the channel ends the threads once the queue is drained.
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn finish(state: &(Mutex<State>, Condvar), failure: Option<Error>) {
    let mut st = state.0.lock().unwrap_or_else(|e| e.into_inner());
    st.pending -= 1;
    if let Some(e) = failure {
        st.failed.get_or_insert(e);
    }
    drop(st);
    state.1.notify_all();
}

fn work(backend: &dyn Backend, rx: &Mutex<Receiver<Job>>, state: &(Mutex<State>, Condvar)) {
    loop {
        let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let failed = state
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failed
            .is_some();
        // After a failure the rest is dropped: nothing will be committed.
        let result = if failed {
            Ok(())
        } else {
            // An object already there under a content name is the same one.
            // A panic must still count the job done, or flush would wait
            // for it forever.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                backend
                    .put_new_owned(&job.key, job.body)
                    .and_then(|_| (job.stored)())
            }))
            .unwrap_or_else(|_| Err(Error::invalid(format!("uploading {} panicked", job.key))))
        };
        finish(state, result.err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::backend::dir::DirBackend;

    #[test]
    fn flush_waits_for_every_upload() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(DirBackend::new(dir.path()));
        let up = Uploader::new(backend.clone(), 4, 2).unwrap();
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for i in 0..100 {
            let done = done.clone();
            let stored: Stored = Box::new(move || {
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            });
            up.send(format!("c/{i}"), vec![i as u8; 1000], stored)
                .unwrap();
        }
        up.flush().unwrap();
        assert_eq!(backend.list("c/").unwrap().len(), 100);
        assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 100);
        assert_eq!(backend.get("c/7").unwrap().unwrap(), vec![7u8; 1000]);
    }

    #[test]
    fn a_failure_is_reported_and_stays() {
        let dir = tempfile::tempdir().unwrap();
        // A file where a directory must go: the write under it fails.
        std::fs::write(dir.path().join("c"), b"").unwrap();
        let backend: Arc<dyn Backend> = Arc::new(DirBackend::new(dir.path()));
        let up = Uploader::new(backend, 4, 2).unwrap();
        up.send("c/1".into(), vec![1], Box::new(|| Ok(()))).unwrap();
        assert!(up.flush().is_err());
        assert!(up.send("d/1".into(), vec![1], Box::new(|| Ok(()))).is_err());
        assert!(up.flush().is_err());
    }
}
