//! HTTP basic authentication for the daemon's endpoints, as node_exporter's web config
//! does it: users with bcrypt password hashes, every route behind it. bcrypt is slow on
//! purpose (tens of ms), which would let any client burn the daemon's CPU, so a verified
//! credential is remembered (the exact header, compared in constant time) and only new
//! ones pay the hash; an unknown user costs the same hash as a known one.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use axum::{
    extract::Request,
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine as _;

/// Users and their bcrypt hashes.
#[derive(Clone, Debug)]
pub struct BasicAuth {
    users: Arc<BTreeMap<String, String>>,
    /// A hash at the users' cost to verify unknown users against.
    dummy: Arc<String>,
    /// Authorization headers already verified (at most [`REMEMBERED`]).
    verified: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// Verified credentials remembered.
const REMEMBERED: usize = 16;
/// The longest Authorization header looked at.
const MAX_HEADER: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("basic_auth_users: the hash of {user:?} is not a bcrypt hash ($2a$, $2b$ or $2y$)")]
    NotBcrypt { user: String },
    #[error("basic_auth_users: user names may not be empty or contain ':'")]
    BadUser,
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
        let cost = users
            .values()
            .filter_map(|h| h.parse::<bcrypt::HashParts>().ok())
            .map(|p| p.get_cost())
            .max()
            .unwrap_or(bcrypt::DEFAULT_COST);
        let dummy = bcrypt::hash(format!("{:?}", std::time::SystemTime::now()), cost)
            .map_err(|_| AuthConfigError::BadUser)?;
        Ok(BasicAuth {
            dummy: Arc::new(dummy),
            users: Arc::new(users),
            verified: Arc::default(),
        })
    }

    /// Whether `authorization` (the header's value) names a user with the right password.
    pub fn check(&self, authorization: &[u8]) -> bool {
        if authorization.len() > MAX_HEADER {
            return false;
        }
        {
            let known = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if known.iter().any(|k| constant_time_eq(k, authorization)) {
                return true;
            }
        }
        let Some(encoded) = authorization.strip_prefix(b"Basic ") else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            return false;
        };
        let Ok(text) = std::str::from_utf8(&decoded) else {
            return false;
        };
        let Some((user, password)) = text.split_once(':') else {
            return false;
        };
        // An unknown user costs a bcrypt verification too: timing tells no user names.
        let hash = self.users.get(user).unwrap_or(&self.dummy);
        let ok = bcrypt::verify(password, hash).unwrap_or(false) && self.users.contains_key(user);
        if ok {
            let mut known = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if known.len() >= REMEMBERED {
                known.remove(0);
            }
            known.push(authorization.to_vec());
        }
        ok
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The middleware: 401 with a challenge unless the request carries a valid credential.
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
    let checker = auth.clone();
    // bcrypt is CPU work: off the async thread.
    let ok = tokio::task::spawn_blocking(move || checker.check(&header))
        .await
        .unwrap_or(false);
    if ok {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"memfabric\"")],
        "unauthorized\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, pass: &str) -> Vec<u8> {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        format!("Basic {b}").into_bytes()
    }

    #[test]
    fn only_the_right_password_passes() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new([("prom".to_owned(), hash)].into()).unwrap();
        assert!(auth.check(&header("prom", "s3cret")));
        // Remembered now, and still only for the exact credential.
        assert!(auth.check(&header("prom", "s3cret")));
        assert!(!auth.check(&header("prom", "s3cret ")));
        assert!(!auth.check(&header("other", "s3cret")));
        assert!(!auth.check(b"Bearer x"));
        assert!(!auth.check(b"Basic !!!not-base64"));
        assert!(!auth.check(&vec![b'A'; 5000]));
        assert!(!auth.check(b""));
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(BasicAuth::new([("u".to_owned(), "plain".to_owned())].into()).is_err());
        let h = bcrypt::hash("x", 4).unwrap();
        assert!(BasicAuth::new([("a:b".to_owned(), h)].into()).is_err());
    }
}
