//! HTTP basic authentication for the daemon's endpoints, as node_exporter's web config
//! does it: users with bcrypt password hashes, every route behind it.
//!
//! bcrypt is slow on purpose (tens of ms), which would let any client burn the daemon's
//! CPU. So:
//! - a verified credential is remembered (the exact header, compared in constant time) and
//!   only new ones pay the hash;
//! - a failed one is remembered too, for [`FAILED_FOR`]: sending it again costs nothing;
//! - at most [`CONCURRENT`] verifications run at once, the others wait for a turn (at most
//!   [`QUEUE_WAIT`], then 503): a flood of wrong credentials costs at most two threads;
//! - every verification costs the same, whoever the user: an unknown user is checked
//!   against a dummy hash at the highest cost configured, and a user whose hash has a lower
//!   cost is padded with dummy verifications at that cost up to the same work.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    extract::Request,
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine as _;

/// Verified credentials remembered.
const REMEMBERED: usize = 16;
/// Failed credentials remembered (by hash), each for [`FAILED_FOR`].
const FAILED_REMEMBERED: usize = 4096;
const FAILED_FOR: Duration = Duration::from_secs(60);
/// bcrypt verifications at once.
pub const CONCURRENT: usize = 2;
/// How long a request waits for a verification slot before 503.
const QUEUE_WAIT: Duration = Duration::from_secs(5);
/// The longest Authorization header looked at.
const MAX_HEADER: usize = 1024;

/// Users and their bcrypt hashes.
#[derive(Clone, Debug)]
pub struct BasicAuth {
    users: Arc<BTreeMap<String, String>>,
    /// Per bcrypt cost in use, a hash to verify against (unknown users, padding).
    dummies: Arc<BTreeMap<u32, String>>,
    max_cost: u32,
    /// Authorization headers already verified (at most [`REMEMBERED`]).
    verified: Arc<Mutex<Vec<Vec<u8>>>>,
    /// xxh3 of headers that failed, with when (oldest first).
    failed: Arc<Mutex<VecDeque<(u64, Instant)>>>,
    slots: Arc<tokio::sync::Semaphore>,
    stats: Arc<AuthStats>,
}

/// What the verifications cost so far.
#[derive(Debug, Default)]
pub struct AuthStats {
    /// bcrypt verifications of a presented credential (padding not counted).
    pub verifications: AtomicU64,
    /// The most that ran at once.
    pub peak_concurrent: AtomicUsize,
    /// bcrypt work done, in units of one round of its key schedule (2^cost per
    /// verification, padding included).
    pub work: AtomicU64,
    running: AtomicUsize,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("basic_auth_users: the hash of {user:?} is not a bcrypt hash ($2a$, $2b$ or $2y$)")]
    NotBcrypt { user: String },
    #[error("basic_auth_users: user names may not be empty or contain ':'")]
    BadUser,
}

/// The outcome of a credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
    /// Every verification slot was taken for [`QUEUE_WAIT`].
    Busy,
}

impl BasicAuth {
    pub fn new(users: BTreeMap<String, String>) -> Result<BasicAuth, AuthConfigError> {
        for (user, hash) in &users {
            if user.is_empty() || user.contains(':') {
                return Err(AuthConfigError::BadUser);
            }
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(AuthConfigError::NotBcrypt { user: user.clone() });
            }
        }
        let costs: std::collections::BTreeSet<u32> = users
            .values()
            .filter_map(|h| h.parse::<bcrypt::HashParts>().ok())
            .map(|p| p.get_cost())
            .collect();
        let max_cost = costs.last().copied().unwrap_or(bcrypt::DEFAULT_COST);
        let mut dummies = BTreeMap::new();
        for cost in costs.into_iter().chain([max_cost]) {
            let h = bcrypt::hash(format!("{:?}", std::time::SystemTime::now()), cost)
                .map_err(|_| AuthConfigError::BadUser)?;
            dummies.insert(cost, h);
        }
        Ok(BasicAuth {
            dummies: Arc::new(dummies),
            max_cost,
            users: Arc::new(users),
            verified: Arc::default(),
            failed: Arc::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(CONCURRENT)),
            stats: Arc::default(),
        })
    }

    pub fn stats(&self) -> &AuthStats {
        &self.stats
    }

    /// The counters, shared (for the exposition).
    pub fn stats_handle(&self) -> Arc<AuthStats> {
        self.stats.clone()
    }

    /// What is known of `authorization` without a hash: remembered as verified or as
    /// failed lately, or malformed.
    fn remembered(&self, authorization: &[u8]) -> Option<bool> {
        if authorization.len() > MAX_HEADER || !authorization.starts_with(b"Basic ") {
            return Some(false);
        }
        {
            let known = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if known.iter().any(|k| constant_time_eq(k, authorization)) {
                return Some(true);
            }
        }
        let key = xxhash_rust::xxh3::xxh3_64(authorization);
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        while failed
            .front()
            .is_some_and(|(_, at)| at.elapsed() > FAILED_FOR)
        {
            failed.pop_front();
        }
        failed.iter().any(|(k, _)| *k == key).then_some(false)
    }

    fn remember(&self, authorization: &[u8], ok: bool) {
        if ok {
            let mut known = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if known.len() >= REMEMBERED {
                known.remove(0);
            }
            known.push(authorization.to_vec());
        } else {
            let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
            if failed.len() >= FAILED_REMEMBERED {
                failed.pop_front();
            }
            failed.push_back((xxhash_rust::xxh3::xxh3_64(authorization), Instant::now()));
        }
    }

    /// The bcrypt work for one credential, the same whoever the user (see the module doc).
    fn hash_check(&self, authorization: &[u8]) -> bool {
        let Some(text) = authorization
            .strip_prefix(b"Basic ")
            .and_then(|e| base64::engine::general_purpose::STANDARD.decode(e).ok())
            .and_then(|d| String::from_utf8(d).ok())
        else {
            return false;
        };
        let Some((user, password)) = text.split_once(':') else {
            return false;
        };
        let running = self.stats.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.stats
            .peak_concurrent
            .fetch_max(running, Ordering::SeqCst);
        self.stats.verifications.fetch_add(1, Ordering::Relaxed);
        let (hash, cost) = match self.users.get(user) {
            Some(h) => (
                h.as_str(),
                h.parse::<bcrypt::HashParts>()
                    .map_or(self.max_cost, |p| p.get_cost()),
            ),
            None => (self.dummies[&self.max_cost].as_str(), self.max_cost),
        };
        let ok = bcrypt::verify(password, hash).unwrap_or(false) && self.users.contains_key(user);
        self.stats.work.fetch_add(1 << cost, Ordering::Relaxed);
        // Padding: 2^max = 2^cost * 2^(max - cost) units of work.
        if cost < self.max_cost
            && let Some(d) = self.dummies.get(&cost)
        {
            for _ in 1..(1u64 << (self.max_cost - cost).min(16)) {
                let _ = bcrypt::verify(password, d);
                self.stats.work.fetch_add(1 << cost, Ordering::Relaxed);
            }
        }
        self.stats.running.fetch_sub(1, Ordering::SeqCst);
        ok
    }

    /// Whether `authorization` (the header's value) names a user with the right password,
    /// with the bounds of the module doc.
    pub async fn verify(&self, authorization: Vec<u8>) -> Verdict {
        let verdict = |ok| {
            if ok {
                Verdict::Allowed
            } else {
                Verdict::Denied
            }
        };
        if let Some(ok) = self.remembered(&authorization) {
            return verdict(ok);
        }
        let Ok(Ok(_slot)) =
            tokio::time::timeout(QUEUE_WAIT, self.slots.clone().acquire_owned()).await
        else {
            return Verdict::Busy;
        };
        // Another request may have settled the same credential meanwhile.
        if let Some(ok) = self.remembered(&authorization) {
            return verdict(ok);
        }
        let checker = self.clone();
        // bcrypt is CPU work: off the async thread, holding the slot.
        let ok = tokio::task::spawn_blocking(move || {
            let ok = checker.hash_check(&authorization);
            checker.remember(&authorization, ok);
            ok
        })
        .await
        .unwrap_or(false);
        verdict(ok)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The middleware: 401 with a challenge unless the request carries a valid credential;
/// 503 when verifications are saturated.
pub async fn require(
    axum::extract::State(auth): axum::extract::State<BasicAuth>,
    req: Request,
    next: Next,
) -> Response {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default()
        .to_vec();
    match auth.verify(header).await {
        Verdict::Allowed => next.run(req).await,
        Verdict::Denied => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"memfabric\"")],
            "unauthorized\n",
        )
            .into_response(),
        Verdict::Busy => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "too many credentials to verify; try again\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, pass: &str) -> Vec<u8> {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        format!("Basic {b}").into_bytes()
    }

    fn block(auth: &BasicAuth, h: Vec<u8>) -> Verdict {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(auth.verify(h))
    }

    #[test]
    fn only_the_right_password_passes() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new([("prom".to_owned(), hash)].into()).unwrap();
        assert_eq!(block(&auth, header("prom", "s3cret")), Verdict::Allowed);
        // Remembered now, and still only for the exact credential.
        assert_eq!(block(&auth, header("prom", "s3cret")), Verdict::Allowed);
        assert_eq!(block(&auth, header("prom", "s3cret ")), Verdict::Denied);
        assert_eq!(block(&auth, header("other", "s3cret")), Verdict::Denied);
        for bad in [
            b"Bearer x".to_vec(),
            b"Basic !!!not-base64".to_vec(),
            vec![b'A'; 5000],
            Vec::new(),
        ] {
            assert_eq!(block(&auth, bad), Verdict::Denied);
        }
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(BasicAuth::new([("u".to_owned(), "plain".to_owned())].into()).is_err());
        let h = bcrypt::hash("x", 4).unwrap();
        assert!(BasicAuth::new([("a:b".to_owned(), h)].into()).is_err());
    }

    /// A flood of wrong credentials: two verifications at most run at once, and a
    /// credential that failed costs nothing when sent again.
    #[test]
    fn wrong_credentials_are_bounded_and_remembered() {
        let hash = bcrypt::hash("s3cret", 6).unwrap();
        let auth = BasicAuth::new([("prom".to_owned(), hash)].into()).unwrap();
        // Verifications run on the blocking pool: many at once unless bounded.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let verdicts = rt.block_on(async {
            let tasks: Vec<_> = (0..40)
                .map(|i| {
                    let a = auth.clone();
                    tokio::spawn(async move {
                        a.verify(header("prom", &format!("guess{}", i % 10))).await
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        assert!(
            verdicts.iter().all(|v| *v == Verdict::Denied),
            "{verdicts:?}"
        );
        let peak = auth.stats().peak_concurrent.load(Ordering::SeqCst);
        assert!((1..=CONCURRENT).contains(&peak), "{peak} at once");
        // Ten distinct guesses: each hashed once (twice at most, when its repeat took the
        // other slot before the first was remembered), the repeats remembered.
        let n = auth.stats().verifications.load(Ordering::Relaxed);
        assert!(
            (10..10 + CONCURRENT as u64).contains(&n),
            "{n} verifications"
        );
    }

    /// An unknown user and a user whose hash is cheaper cost the same work as the
    /// costliest user: timing tells neither. Counted in bcrypt's units (2^cost per
    /// verification), not timed: the machine is shared.
    #[test]
    fn every_user_costs_the_same() {
        let cheap = bcrypt::hash("a", 4).unwrap();
        let dear = bcrypt::hash("b", 7).unwrap();
        let auth = BasicAuth::new([("cheap".to_owned(), cheap), ("dear".to_owned(), dear)].into())
            .unwrap();
        let work = |user: &str| {
            let before = auth.stats().work.load(Ordering::Relaxed);
            assert!(!auth.hash_check(&header(user, "wrong")));
            auth.stats().work.load(Ordering::Relaxed) - before
        };
        let dear = work("dear");
        assert_eq!(dear, 1 << 7);
        // Without padding the cheap user would cost 1/8 of the dear one.
        assert_eq!(work("cheap"), dear);
        assert_eq!(work("nobody"), dear);
        // And a right password costs the same as a wrong one.
        let before = auth.stats().work.load(Ordering::Relaxed);
        assert!(auth.hash_check(&header("cheap", "a")));
        assert_eq!(auth.stats().work.load(Ordering::Relaxed) - before, dear);
    }
}
