//! The proxy's route table: which request targets the relay accepts, and how
//! each is treated (metered, free, owned, answered locally, refused). The
//! target is parsed once into a canonical path; the decision is made on that
//! path, and that same path is what goes upstream.

use std::fmt;

use http::Method;

/// A request path already in the canonical form of RFC 3986 §6.2.2: no dot
/// segments, no empty segments (`//`), percent-escapes only for bytes that
/// need them and written in upper case, and only characters every URL
/// parser leaves alone. A target that is not already canonical is refused,
/// never rewritten: rewriting is how a decision and a forward come apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath(String);

/// Why a request target is not a canonical path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    #[error("the request target must be a path starting with `/`")]
    NotAPath,
    #[error("the path contains `{0}`, which must be percent-encoded")]
    ForbiddenCharacter(char),
    #[error("the path contains a malformed percent-escape")]
    MalformedEscape,
    #[error("the path percent-encodes `{0}`, which must be written as is")]
    NeedlessEscape(char),
    #[error("the path has a lower-case percent-escape; write `%{0}`")]
    LowercaseEscape(String),
    #[error("the path contains an empty segment (`//`)")]
    EmptySegment,
    #[error("the path contains a `.` or `..` segment")]
    DotSegment,
}

/// RFC 3986 unreserved characters: never percent-encoded in canonical form.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// `pchar` other than unreserved and percent-escapes: sub-delims, `:`, `@`.
fn is_plain_reserved(byte: u8) -> bool {
    matches!(
        byte,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' | b':' | b'@'
    )
}

impl CanonicalPath {
    /// Accepts `path` only if it is already canonical.
    pub fn parse(path: &str) -> Result<CanonicalPath, PathProblem> {
        let bytes = path.as_bytes();
        if bytes.first() != Some(&b'/') {
            return Err(PathProblem::NotAPath);
        }
        let mut i = 0;
        while i < bytes.len() {
            let byte = bytes[i];
            if byte == b'%' {
                let escape = bytes
                    .get(i + 1..i + 3)
                    .ok_or(PathProblem::MalformedEscape)?;
                if !escape.iter().all(u8::is_ascii_hexdigit) {
                    return Err(PathProblem::MalformedEscape);
                }
                let text = std::str::from_utf8(escape).map_err(|_| PathProblem::MalformedEscape)?;
                let decoded =
                    u8::from_str_radix(text, 16).map_err(|_| PathProblem::MalformedEscape)?;
                if is_unreserved(decoded) {
                    return Err(PathProblem::NeedlessEscape(char::from(decoded)));
                }
                if escape.iter().any(u8::is_ascii_lowercase) {
                    return Err(PathProblem::LowercaseEscape(text.to_ascii_uppercase()));
                }
                i += 3;
                continue;
            }
            if !(byte == b'/' || is_unreserved(byte) || is_plain_reserved(byte)) {
                // Non-ASCII arrives as its first byte; name a readable character.
                let shown = path[i..].chars().next().unwrap_or('?');
                return Err(PathProblem::ForbiddenCharacter(shown));
            }
            i += 1;
        }
        let segments: Vec<&str> = path[1..].split('/').collect();
        let last = segments.len() - 1;
        for (index, segment) in segments.iter().enumerate() {
            match *segment {
                // A trailing slash is canonical (and matches no route).
                "" if index != last => return Err(PathProblem::EmptySegment),
                "." | ".." => return Err(PathProblem::DotSegment),
                _ => {}
            }
        }
        Ok(CanonicalPath(path.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn segments(&self) -> impl Iterator<Item = &str> {
        self.0[1..].split('/')
    }
}

impl fmt::Display for CanonicalPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How the relay treats a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// Answered by the relay itself; nothing goes upstream.
    Local,
    /// Admitted (status, allowlists, rate window, quota), forwarded, and
    /// its usage recorded.
    Metered,
    /// Authenticated and checked (status, allowlists), forwarded, never charged.
    Free,
    /// Objects owned by the key that created them: each key sees, changes
    /// and references only its own.
    Owned,
    /// Never forwarded.
    Refused,
    /// An admin-opened prefix: authenticated, forwarded, never metered.
    PassThrough,
}

impl Treatment {
    pub fn as_str(self) -> &'static str {
        match self {
            Treatment::Local => "local",
            Treatment::Metered => "metered",
            Treatment::Free => "free",
            Treatment::Owned => "owned",
            Treatment::Refused => "refused",
            Treatment::PassThrough => "pass-through",
        }
    }
}

/// A route the relay knows, with the ids its path carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Hello,
    Messages,
    CountTokens,
    ListModels,
    GetModel(String),
    CreateBatch,
    ListBatches,
    GetBatch(String),
    CancelBatch(String),
    DeleteBatch(String),
    BatchResults(String),
    UploadFile,
    ListFiles,
    GetFile(String),
    FileContent(String),
    DeleteFile(String),
    /// The legacy Text Completions API: its answers carry no usage the
    /// relay could meter.
    Complete,
    PassThrough,
}

/// One row of the table: method, path template (`{…}` is one id segment),
/// treatment, and what it is, for the README.
pub struct RouteEntry {
    pub method: Method,
    pub template: &'static str,
    pub treatment: Treatment,
    pub what: &'static str,
}

const fn row(
    method: Method,
    template: &'static str,
    treatment: Treatment,
    what: &'static str,
) -> RouteEntry {
    RouteEntry {
        method,
        template,
        treatment,
        what,
    }
}

/// Every route the proxy serves. `route()` matches against exactly these;
/// the README's route table is this list (a test keeps them equal).
pub static ROUTE_TABLE: &[RouteEntry] = &[
    row(
        Method::HEAD,
        "/api/hello",
        Treatment::Local,
        "Claude Code's connectivity check (also GET)",
    ),
    row(
        Method::GET,
        "/api/hello",
        Treatment::Local,
        "the same check",
    ),
    row(
        Method::HEAD,
        "/",
        Treatment::Local,
        "older Claude Code versions' check",
    ),
    row(
        Method::POST,
        "/v1/messages",
        Treatment::Metered,
        "create a message (streamed or not)",
    ),
    row(
        Method::POST,
        "/v1/messages/count_tokens",
        Treatment::Free,
        "count tokens; model allowlist applies",
    ),
    row(
        Method::GET,
        "/v1/models",
        Treatment::Free,
        "the models this key may use and the aliases for them, answered by the relay",
    ),
    row(
        Method::GET,
        "/v1/models/{model_id}",
        Treatment::Free,
        "one of those models or aliases",
    ),
    row(
        Method::POST,
        "/v1/messages/batches",
        Treatment::Owned,
        "create a batch: admitted like its requests, usage recorded once from its results",
    ),
    row(
        Method::GET,
        "/v1/messages/batches",
        Treatment::Owned,
        "the key's own batches",
    ),
    row(
        Method::GET,
        "/v1/messages/batches/{batch_id}",
        Treatment::Owned,
        "one of the key's batches",
    ),
    row(
        Method::POST,
        "/v1/messages/batches/{batch_id}/cancel",
        Treatment::Owned,
        "cancel one of the key's batches",
    ),
    row(
        Method::DELETE,
        "/v1/messages/batches/{batch_id}",
        Treatment::Owned,
        "delete one of the key's batches (its usage is recorded first)",
    ),
    row(
        Method::GET,
        "/v1/messages/batches/{batch_id}/results",
        Treatment::Owned,
        "results (JSONL); the first full read records the batch's usage",
    ),
    row(
        Method::POST,
        "/v1/files",
        Treatment::Owned,
        "upload a file (multipart, streamed)",
    ),
    row(
        Method::GET,
        "/v1/files",
        Treatment::Owned,
        "the key's own files",
    ),
    row(
        Method::GET,
        "/v1/files/{file_id}",
        Treatment::Owned,
        "one of the key's files",
    ),
    row(
        Method::GET,
        "/v1/files/{file_id}/content",
        Treatment::Owned,
        "download one of the key's files",
    ),
    row(
        Method::DELETE,
        "/v1/files/{file_id}",
        Treatment::Owned,
        "delete one of the key's files",
    ),
    row(
        Method::POST,
        "/v1/complete",
        Treatment::Refused,
        "legacy Text Completions: no usage to meter",
    ),
];

/// Why no route serves a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteRefusal {
    /// The path is not canonical (400).
    BadPath(PathProblem),
    /// No route has this path (404).
    UnknownPath,
    /// The path exists, but not with this method (405); the allowed ones.
    MethodNotAllowed(Vec<Method>),
}

/// An id segment of a path: what Anthropic's ids (`msgbatch_…`, `file_…`,
/// model ids) are made of, and nothing a server could decode into a path.
pub fn is_id_segment(segment: &str) -> bool {
    (1..=256).contains(&segment.len())
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'))
}

/// The ids a template's `{…}` segments captured, or `None` if it does not
/// match the path's `segments`. Allocates only for a match with ids.
fn match_template(template: &str, segments: &[&str]) -> Option<Vec<String>> {
    let mut ids = Vec::new();
    let mut wanted = template[1..].split('/');
    for got in segments {
        let want = wanted.next()?;
        if want.starts_with('{') {
            if !is_id_segment(got) {
                return None;
            }
            ids.push((*got).to_owned());
        } else if want != *got {
            return None;
        }
    }
    wanted.next().is_none().then_some(ids)
}

/// Path prefixes an admin opened for unmetered pass-through
/// (`PASSTHROUGH_PATH_PREFIXES`). A prefix may not reach any route of the
/// table: those keep their own treatment whatever is configured.
#[derive(Debug, Clone, Default)]
pub struct PassThrough(Vec<CanonicalPath>);

impl PassThrough {
    /// Parses a comma-separated list; names the offending entry on error.
    pub fn parse(list: &str) -> Result<PassThrough, String> {
        let mut prefixes = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let entry = entry.trim_end_matches('/');
            let path = CanonicalPath::parse(entry).map_err(|e| format!("`{entry}`: {e}"))?;
            if !path.segments().all(is_id_segment) {
                return Err(format!(
                    "`{entry}`: segments may hold only letters, digits and - _ . : @"
                ));
            }
            let overlaps = ROUTE_TABLE.iter().any(|route| {
                let table: Vec<&str> = route.template[1..].split('/').collect();
                let prefix: Vec<&str> = path.segments().collect();
                table
                    .iter()
                    .zip(&prefix)
                    .all(|(t, p)| t.starts_with('{') || t == p)
            });
            if overlaps {
                return Err(format!(
                    "`{entry}`: overlaps a route the relay meters, owns, refuses or answers itself"
                ));
            }
            prefixes.push(path);
        }
        Ok(PassThrough(prefixes))
    }

    /// Whether `path` is one of the prefixes or lies under one, with plain
    /// segments only (no escapes, no `;`): nothing a server behind the
    /// upstream could read as another path.
    fn covers(&self, path: &CanonicalPath) -> bool {
        self.0.iter().any(|prefix| {
            path.as_str() == prefix.as_str()
                || path
                    .as_str()
                    .strip_prefix(prefix.as_str())
                    .and_then(|rest| rest.strip_prefix('/'))
                    .is_some_and(|rest| rest.split('/').all(is_id_segment))
        })
    }

    pub fn prefixes(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(CanonicalPath::as_str)
    }
}

/// Methods a pass-through prefix may be used with.
const PASS_THROUGH_METHODS: [Method; 3] = [Method::GET, Method::POST, Method::DELETE];

/// Finds the route for `method` on `path` (already the raw request path).
pub fn route(
    method: &Method,
    raw_path: &str,
    pass_through: &PassThrough,
) -> Result<(Route, CanonicalPath), RouteRefusal> {
    let known_method =
        ROUTE_TABLE.iter().any(|r| r.method == *method) || PASS_THROUGH_METHODS.contains(method);
    if !known_method {
        // CONNECT, TRACE, OPTIONS (`*` included), PUT, PATCH, extensions.
        return Err(RouteRefusal::MethodNotAllowed(Vec::new()));
    }
    let path = CanonicalPath::parse(raw_path).map_err(RouteRefusal::BadPath)?;
    let segments: Vec<&str> = path.segments().collect();
    let mut allowed = Vec::new();
    for entry in ROUTE_TABLE {
        let Some(mut ids) = match_template(entry.template, &segments) else {
            continue;
        };
        if entry.method != *method {
            allowed.push(entry.method.clone());
            continue;
        }
        let mut id = || ids.pop().unwrap_or_default();
        let route = match (entry.method.as_str(), entry.template) {
            (_, "/api/hello" | "/") => Route::Hello,
            (_, "/v1/messages") => Route::Messages,
            (_, "/v1/messages/count_tokens") => Route::CountTokens,
            (_, "/v1/models") => Route::ListModels,
            (_, "/v1/models/{model_id}") => Route::GetModel(id()),
            ("POST", "/v1/messages/batches") => Route::CreateBatch,
            ("GET", "/v1/messages/batches") => Route::ListBatches,
            ("GET", "/v1/messages/batches/{batch_id}") => Route::GetBatch(id()),
            ("DELETE", _) if entry.template.starts_with("/v1/messages/batches/") => {
                Route::DeleteBatch(id())
            }
            (_, "/v1/messages/batches/{batch_id}/cancel") => Route::CancelBatch(id()),
            (_, "/v1/messages/batches/{batch_id}/results") => Route::BatchResults(id()),
            ("POST", "/v1/files") => Route::UploadFile,
            ("GET", "/v1/files") => Route::ListFiles,
            ("GET", "/v1/files/{file_id}") => Route::GetFile(id()),
            ("DELETE", "/v1/files/{file_id}") => Route::DeleteFile(id()),
            (_, "/v1/files/{file_id}/content") => Route::FileContent(id()),
            (_, "/v1/complete") => Route::Complete,
            _ => continue,
        };
        return Ok((route, path));
    }
    if !allowed.is_empty() {
        return Err(RouteRefusal::MethodNotAllowed(allowed));
    }
    if pass_through.covers(&path) && PASS_THROUGH_METHODS.contains(method) {
        return Ok((Route::PassThrough, path));
    }
    Err(RouteRefusal::UnknownPath)
}

impl Route {
    pub fn treatment(&self) -> Treatment {
        match self {
            Route::Hello => Treatment::Local,
            Route::Messages => Treatment::Metered,
            Route::CountTokens | Route::ListModels | Route::GetModel(_) => Treatment::Free,
            Route::Complete => Treatment::Refused,
            Route::PassThrough => Treatment::PassThrough,
            _ => Treatment::Owned,
        }
    }

    /// Requests whose body names a model the key's allowlist must admit.
    pub fn names_model(&self) -> bool {
        matches!(self, Route::Messages | Route::CountTokens)
    }
}

/// The route table as the README shows it (a markdown table).
pub fn route_table_markdown() -> String {
    let mut out = String::from("| method | path | treatment | what |\n|---|---|---|---|\n");
    for entry in ROUTE_TABLE {
        out.push_str(&format!(
            "| `{}` | `{}` | {} | {} |\n",
            entry.method,
            entry.template,
            entry.treatment.as_str(),
            entry.what
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(method: Method, path: &str) -> Result<Route, RouteRefusal> {
        route(&method, path, &PassThrough::default()).map(|(route, _)| route)
    }

    #[test]
    fn canonical_paths_are_accepted_as_they_are() {
        for path in [
            "/v1/messages",
            "/v1/messages/",
            "/v1/files/file_011CNha8iCJcU1wXNR6q4V8w",
            "/v1/a%2Fb",
            "/v1/%C3%A9",
            "/v1/x:y@z;a=b,c+d!$&'()*",
            "/",
        ] {
            assert_eq!(CanonicalPath::parse(path).unwrap().as_str(), path);
        }
    }

    #[test]
    fn every_non_canonical_spelling_is_refused() {
        let cases: &[(&str, PathProblem)] = &[
            ("/v1/./messages", PathProblem::DotSegment),
            ("/v1/x/../messages", PathProblem::DotSegment),
            ("/v1/messages/..", PathProblem::DotSegment),
            ("/v1/%2e/messages", PathProblem::NeedlessEscape('.')),
            ("/v1/%2E%2E/messages", PathProblem::NeedlessEscape('.')),
            ("/v1/x/%2e%2e/messages", PathProblem::NeedlessEscape('.')),
            ("/v1/%6Dessages", PathProblem::NeedlessEscape('m')),
            ("/v1/a%2fb", PathProblem::LowercaseEscape("2F".into())),
            ("/v1//messages", PathProblem::EmptySegment),
            ("//v1/messages", PathProblem::EmptySegment),
            ("/v1\\messages", PathProblem::ForbiddenCharacter('\\')),
            ("/v1/mess ages", PathProblem::ForbiddenCharacter(' ')),
            ("/v1/%zz", PathProblem::MalformedEscape),
            ("/v1/%4", PathProblem::MalformedEscape),
            ("/v1/é", PathProblem::ForbiddenCharacter('é')),
            ("*", PathProblem::NotAPath),
            ("", PathProblem::NotAPath),
        ];
        for (path, problem) in cases {
            assert_eq!(CanonicalPath::parse(path), Err(problem.clone()), "{path}");
        }
    }

    #[test]
    fn routes_are_decided_on_the_exact_path() {
        assert_eq!(decide(Method::POST, "/v1/messages"), Ok(Route::Messages));
        assert_eq!(
            decide(Method::POST, "/v1/messages/batches"),
            Ok(Route::CreateBatch)
        );
        assert_eq!(
            decide(Method::GET, "/v1/messages/batches/msgbatch_01abc/results"),
            Ok(Route::BatchResults("msgbatch_01abc".into()))
        );
        assert_eq!(
            decide(Method::DELETE, "/v1/messages/batches/msgbatch_01abc"),
            Ok(Route::DeleteBatch("msgbatch_01abc".into()))
        );
        assert_eq!(
            decide(Method::GET, "/v1/files/file_1/content"),
            Ok(Route::FileContent("file_1".into()))
        );
        assert_eq!(decide(Method::GET, "/api/hello"), Ok(Route::Hello));
        assert_eq!(decide(Method::HEAD, "/"), Ok(Route::Hello));
        assert_eq!(decide(Method::POST, "/v1/complete"), Ok(Route::Complete));
        for unknown in [
            "/v1/messages/",
            "/V1/messages",
            "/v1/messages%3Fbeta=true",
            "/v1/skills",
            "/v1/files/a%2Fb",
            "/v1/organizations/me",
        ] {
            assert_eq!(
                decide(Method::POST, unknown),
                Err(RouteRefusal::UnknownPath),
                "{unknown}"
            );
        }
        assert_eq!(
            decide(Method::GET, "/v1/messages"),
            Err(RouteRefusal::MethodNotAllowed(vec![Method::POST]))
        );
        for method in ["CONNECT", "TRACE", "OPTIONS", "PUT", "PATCH", "PURGE"] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(
                decide(method.clone(), "/v1/messages"),
                Err(RouteRefusal::MethodNotAllowed(vec![])),
                "{method}"
            );
        }
        assert!(matches!(
            decide(Method::POST, "/v1/./messages"),
            Err(RouteRefusal::BadPath(_))
        ));
    }

    #[test]
    fn pass_through_prefixes_open_only_paths_outside_the_table() {
        let open = PassThrough::parse(" /v1/skills , /v1/experimental/ ").unwrap();
        let decide = |method: Method, path: &str| route(&method, path, &open).map(|(r, _)| r);
        assert_eq!(decide(Method::GET, "/v1/skills"), Ok(Route::PassThrough));
        assert_eq!(
            decide(Method::POST, "/v1/skills/s1/versions"),
            Ok(Route::PassThrough)
        );
        assert_eq!(
            decide(Method::GET, "/v1/skillsx"),
            Err(RouteRefusal::UnknownPath)
        );
        assert_eq!(
            decide(Method::GET, "/v1/skills/../messages"),
            Err(RouteRefusal::BadPath(PathProblem::DotSegment))
        );
        for tricky in [
            "/v1/skills/..%2F..%2Fv1%2Fmessages",
            "/v1/skills/..;/..;/v1/messages",
            "/v1/skills/a%20b",
        ] {
            assert_eq!(
                decide(Method::GET, tricky),
                Err(RouteRefusal::UnknownPath),
                "{tricky}"
            );
        }
        assert_eq!(decide(Method::POST, "/v1/messages"), Ok(Route::Messages));
        for bad in [
            "/v1",
            "/v1/messages",
            "/v1/files",
            "/v1/complete",
            "/",
            "/v1/./x",
            "/api",
        ] {
            assert!(PassThrough::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn readme_lists_the_route_table() {
        let readme = include_str!("../../../README.md");
        assert!(
            readme.contains(&route_table_markdown()),
            "README.md must contain the route table exactly as route_table_markdown() renders it:\n{}",
            route_table_markdown()
        );
    }
}
