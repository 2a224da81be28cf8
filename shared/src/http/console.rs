//! The web consoles' static assets (`shared/console/`): the admin console at
//! `/admin/console` and the key holder's page at `/api/usage/console`, built
//! into the binaries and served with a strict Content-Security-Policy. The
//! pages only call the documented admin and usage APIs, with the admin
//! token or the holder's key kept in the tab's memory; the assets
//! themselves need no credential.

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// No inline script or style, nothing from another origin, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// One file of a console.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The files every console page may load, by the name under `console/`.
const SHARED_ASSETS: [Asset; 3] = [
    Asset {
        name: "console.css",
        content_type: CSS,
        body: include_str!("../../console/console.css"),
    },
    Asset {
        name: "common.js",
        content_type: JS,
        body: include_str!("../../console/common.js"),
    },
    Asset {
        name: "chart.js",
        content_type: JS,
        body: include_str!("../../console/chart.js"),
    },
];

const ADMIN_PAGE: Asset = Asset {
    name: "admin.html",
    content_type: HTML,
    body: include_str!("../../console/admin.html"),
};
const ADMIN_SCRIPT: Asset = Asset {
    name: "admin.js",
    content_type: JS,
    body: include_str!("../../console/admin.js"),
};
const HOLDER_PAGE: Asset = Asset {
    name: "holder.html",
    content_type: HTML,
    body: include_str!("../../console/holder.html"),
};
const HOLDER_SCRIPT: Asset = Asset {
    name: "holder.js",
    content_type: JS,
    body: include_str!("../../console/holder.js"),
};

/// Strong entity tags, computed once: the assets change only with the
/// binary, so a browser revalidates (`no-cache`) and mostly hears 304.
static ETAGS: LazyLock<Vec<(&'static str, String)>> = LazyLock::new(|| {
    SHARED_ASSETS
        .iter()
        .chain([&ADMIN_PAGE, &ADMIN_SCRIPT, &HOLDER_PAGE, &HOLDER_SCRIPT])
        .map(|asset| {
            let digest = Sha256::digest(asset.body.as_bytes());
            let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
            (asset.name, format!("\"{hex}\""))
        })
        .collect()
});

fn etag_of(asset: &Asset) -> &'static str {
    ETAGS
        .iter()
        .find(|(name, _)| *name == asset.name)
        .map_or("\"\"", |(_, tag)| tag.as_str())
}

/// The headers every console answer carries, errors included.
fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

fn serve(asset: &Asset, request_headers: &HeaderMap) -> Response {
    let etag = etag_of(asset);
    let matches = request_headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag));
    let common = [(header::ETAG, etag), (header::CACHE_CONTROL, "no-cache")];
    let response = if matches {
        (StatusCode::NOT_MODIFIED, common).into_response()
    } else {
        (
            common,
            [(header::CONTENT_TYPE, asset.content_type)],
            asset.body,
        )
            .into_response()
    };
    secure(response)
}

/// One of the files the page `script` may load, or 404.
fn named<'a>(script: &'a Asset, name: &str) -> Option<&'a Asset> {
    SHARED_ASSETS
        .iter()
        .chain([script])
        .find(|asset| asset.name == name)
}

fn asset_or_not_found(script: &Asset, name: &str, headers: &HeaderMap) -> Response {
    match named(script, name) {
        Some(asset) => serve(asset, headers),
        None => secure(ApiError::not_found("no such console file").into_response()),
    }
}

/// `…/console/` would resolve the page's relative links one level too
/// deep: send it to `…/console` (a relative `Location`, so a stage prefix
/// stays).
async fn without_trailing_slash() -> Response {
    secure(
        (
            StatusCode::PERMANENT_REDIRECT,
            [(header::LOCATION, "../console")],
        )
            .into_response(),
    )
}

/// `GET /admin/console` and its files, for the admin router (inside its
/// address check; the APIs the page calls check the admin token).
pub fn admin_routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/admin/console",
            get(|headers: HeaderMap| async move { serve(&ADMIN_PAGE, &headers) }),
        )
        .route("/admin/console/", get(without_trailing_slash))
        .route(
            "/admin/console/{name}",
            get(|Path(name): Path<String>, headers: HeaderMap| async move {
                asset_or_not_found(&ADMIN_SCRIPT, &name, &headers)
            }),
        )
}

/// `GET /api/usage/console` and its files, for the usage router (the APIs
/// the page calls check the holder's key).
pub fn holder_routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/api/usage/console",
            get(|headers: HeaderMap| async move { serve(&HOLDER_PAGE, &headers) }),
        )
        .route("/api/usage/console/", get(without_trailing_slash))
        .route(
            "/api/usage/console/{name}",
            get(|Path(name): Path<String>, headers: HeaderMap| async move {
                asset_or_not_found(&HOLDER_SCRIPT, &name, &headers)
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Request;
    use tower::ServiceExt;

    async fn get_path(router: Router, path: &str, etag: Option<&str>) -> Response {
        let mut request = Request::get(path);
        if let Some(tag) = etag {
            request = request.header(header::IF_NONE_MATCH, tag);
        }
        router
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn pages_carry_the_strict_policy_and_their_content_type() {
        for (router, path, kind) in [
            (admin_routes(), "/admin/console", HTML),
            (admin_routes(), "/admin/console/admin.js", JS),
            (admin_routes(), "/admin/console/console.css", CSS),
            (holder_routes(), "/api/usage/console", HTML),
            (holder_routes(), "/api/usage/console/holder.js", JS),
            (holder_routes(), "/api/usage/console/chart.js", JS),
        ] {
            let response = get_path(router, path, None).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let headers = response.headers();
            assert_eq!(headers[header::CONTENT_TYPE], kind, "{path}");
            assert_eq!(
                headers[header::CONTENT_SECURITY_POLICY],
                CONTENT_SECURITY_POLICY,
                "{path}"
            );
            assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(headers[header::REFERRER_POLICY], "no-referrer");
        }
    }

    #[tokio::test]
    async fn each_page_serves_only_its_own_script() {
        let admin = get_path(admin_routes(), "/admin/console/holder.js", None).await;
        assert_eq!(admin.status(), StatusCode::NOT_FOUND);
        assert!(
            admin
                .headers()
                .contains_key(header::CONTENT_SECURITY_POLICY)
        );
        let holder = get_path(holder_routes(), "/api/usage/console/admin.js", None).await;
        assert_eq!(holder.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_known_etag_is_answered_304() {
        let first = get_path(admin_routes(), "/admin/console/common.js", None).await;
        let tag = first.headers()[header::ETAG].to_str().unwrap().to_owned();
        assert!(tag.starts_with('"') && tag.len() == 26, "{tag}");
        let again = get_path(admin_routes(), "/admin/console/common.js", Some(&tag)).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        let other = get_path(admin_routes(), "/admin/console/chart.js", Some(&tag)).await;
        assert_eq!(other.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_trailing_slash_goes_back_to_the_page_relatively() {
        let response = get_path(holder_routes(), "/api/usage/console/", None).await;
        assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(response.headers()[header::LOCATION], "../console");
    }

    /// The CSP forbids inline code: no page may rely on it.
    #[test]
    fn pages_have_no_inline_script_style_or_handler() {
        for page in [ADMIN_PAGE.body, HOLDER_PAGE.body] {
            let lower = page.to_ascii_lowercase();
            assert!(!lower.contains("<style"), "inline style element");
            assert!(!lower.contains(" style="), "style attribute");
            assert!(!lower.contains(" onclick=") && !lower.contains(" onload="));
            for script in lower.split("<script").skip(1) {
                let tag_end = script.find('>').unwrap();
                assert!(script[..tag_end].contains("src="), "inline script");
            }
        }
    }

    /// Data reaches the page as text: the scripts never assign HTML.
    #[test]
    fn scripts_never_assign_html() {
        for asset in SHARED_ASSETS.iter().chain([&ADMIN_SCRIPT, &HOLDER_SCRIPT]) {
            for banned in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
            ] {
                assert!(!asset.body.contains(banned), "{} uses {banned}", asset.name);
            }
            for banned in ["localStorage", "sessionStorage", "document.cookie"] {
                assert!(!asset.body.contains(banned), "{} uses {banned}", asset.name);
            }
        }
    }
}
