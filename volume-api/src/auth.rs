//! Authentication: Cinder's `noauth` (token `user:project`) or static bearer tokens from a
//! config file, each with its project and roles.
//!
//! Config file (JSON):
//! `{"tokens": [{"token": "s3cret", "user_id": "alice", "project_id": "demo", "roles": ["member"]},
//!              {"token": "r00t", "user_id": "ops", "project_id": "admin", "roles": ["admin"]}]}`
//! Tokens arrive as `X-Auth-Token: TOKEN` or `Authorization: Bearer TOKEN`.

use crate::fault::Fault;
use axum::http::HeaderMap;
use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub user_id: String,
    pub project_id: String,
    pub is_admin: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct TokenEntry {
    pub token: String,
    pub user_id: String,
    pub project_id: String,
    #[serde(default)]
    pub roles: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Default)]
pub struct TokenConfig {
    #[serde(default)]
    pub tokens: Vec<TokenEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// Cinder's noauth: whoever the token names. Unlike Cinder's (where every noauth caller is
    /// admin), only the user `admin` gets the admin role here, so project isolation and
    /// admin-only checks stay testable.
    NoAuth,
    Tokens(TokenConfig),
}

fn token_of(headers: &HeaderMap) -> Option<String> {
    if let Some(t) = headers.get("x-auth-token").and_then(|v| v.to_str().ok()) {
        return Some(t.trim().to_string());
    }
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok())?;
    bearer.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 255 && id.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

impl Auth {
    /// Who sends `headers` and which project the request acts on. `url_project` is the project
    /// id in the URL, preferred over the token's when present (as Cinder's noauth does).
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        url_project: Option<&str>,
    ) -> Result<Principal, Fault> {
        if let Some(p) = url_project.filter(|p| !valid_id(p)) {
            return Err(Fault::BadRequest(format!("Invalid project id {p:?}.")));
        }
        let token = token_of(headers);
        match self {
            Auth::NoAuth => {
                let header_project = headers.get("x-project-id").and_then(|v| v.to_str().ok());
                let (user, token_project) = match token.as_deref() {
                    Some(t) if !t.is_empty() => match t.split_once(':') {
                        Some((u, p)) => (u.to_string(), Some(p.to_string())),
                        None => (t.to_string(), None),
                    },
                    _ => (
                        headers
                            .get("x-user-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string(),
                        None,
                    ),
                };
                let project = url_project
                    .map(str::to_string)
                    .or(token_project)
                    .or(header_project.map(str::to_string))
                    .or_else(|| (!user.is_empty()).then(|| user.clone()))
                    .ok_or_else(|| {
                        Fault::Unauthorized(
                            "Authentication required: send X-Auth-Token user:project.".into(),
                        )
                    })?;
                if !valid_id(&project) {
                    return Err(Fault::BadRequest(format!("Invalid project id {project:?}.")));
                }
                let user = if user.is_empty() { "anonymous".to_string() } else { user };
                Ok(Principal { is_admin: user == "admin", user_id: user, project_id: project })
            }
            Auth::Tokens(config) => {
                let token =
                    token.ok_or_else(|| Fault::Unauthorized("Authentication required.".into()))?;
                let entry = config.tokens.iter().find(|e| e.token == token).ok_or_else(|| {
                    Fault::Unauthorized("The request you have made requires authentication.".into())
                })?;
                let is_admin = entry.roles.iter().any(|r| r == "admin");
                let project = match url_project {
                    Some(p) if p != entry.project_id && !is_admin => {
                        return Err(Fault::Forbidden(format!(
                            "Project {p} in the URL does not match the token's project."
                        )));
                    }
                    Some(p) => p.to_string(),
                    None => entry.project_id.clone(),
                };
                Ok(Principal { user_id: entry.user_id.clone(), project_id: project, is_admin })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn noauth_prefers_the_url_project() {
        let auth = Auth::NoAuth;
        let p = auth.authenticate(&headers(&[("x-auth-token", "admin:demo")]), None).unwrap();
        assert_eq!(
            p,
            Principal { user_id: "admin".into(), project_id: "demo".into(), is_admin: true }
        );
        let p = auth.authenticate(&headers(&[("x-auth-token", "notused")]), Some("demo")).unwrap();
        assert_eq!(
            p,
            Principal { user_id: "notused".into(), project_id: "demo".into(), is_admin: false }
        );
        let p = auth.authenticate(&headers(&[("x-auth-token", "bob")]), None).unwrap();
        assert_eq!(p.project_id, "bob");
        assert_eq!(auth.authenticate(&headers(&[]), None).unwrap_err().code(), 401);
    }

    #[test]
    fn tokens_scope_members_to_their_project() {
        let auth = Auth::Tokens(TokenConfig {
            tokens: vec![
                TokenEntry {
                    token: "m".into(),
                    user_id: "u".into(),
                    project_id: "p".into(),
                    roles: vec!["member".into()],
                },
                TokenEntry {
                    token: "a".into(),
                    user_id: "root".into(),
                    project_id: "ops".into(),
                    roles: vec!["admin".into()],
                },
            ],
        });
        assert_eq!(
            auth.authenticate(&headers(&[("x-auth-token", "m")]), None).unwrap().project_id,
            "p"
        );
        assert_eq!(
            auth.authenticate(&headers(&[("x-auth-token", "m")]), Some("q")).unwrap_err().code(),
            403
        );
        assert_eq!(
            auth.authenticate(&headers(&[("authorization", "Bearer a")]), Some("q"))
                .unwrap()
                .project_id,
            "q"
        );
        assert_eq!(
            auth.authenticate(&headers(&[("x-auth-token", "zz")]), None).unwrap_err().code(),
            401
        );
        assert_eq!(auth.authenticate(&headers(&[]), None).unwrap_err().code(), 401);
    }
}
