//! The walk-through the CMS prints at start: curl commands whose names are
//! free in this database, so they work on a fresh one, after `--seed`, and
//! after an earlier walk-through; and the demo data of `--seed`.

use serde_json::{Value, json};

use super::error::ApiError;
use super::posts::{NewPost, create_post, publish_post};
use super::users::{NewUser, create_user};
use super::{AppState, db, posts};

/// One request of the walk-through.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Step {
    pub(crate) method: &'static str,
    pub(crate) path: String,
    pub(crate) body: Option<Value>,
    /// What the answer shows.
    pub(crate) note: &'static str,
}

impl Step {
    /// The step as a curl command line against `url`.
    pub(crate) fn curl(&self, url: &str) -> String {
        let mut line = match self.method {
            "GET" if self.note.contains("x-cache") => format!("curl -si '{url}{}'", self.path),
            "GET" => format!("curl -s '{url}{}'", self.path),
            method => format!("curl -s -X {method} '{url}{}'", self.path),
        };
        if let Some(body) = &self.body {
            line.push_str(&format!(" -H 'content-type: application/json' -d '{body}'"));
        }
        format!("{line}   # {}", self.note)
    }
}

/// A user, a post by them, publishing it, a search, and a cached read, with
/// the first username of `alice`, `alice2`, … and the slug the post will get.
pub(crate) async fn steps(state: &AppState) -> Result<Vec<Step>, ApiError> {
    let mut username = "alice".to_owned();
    for n in 2.. {
        if db::user_by_name(&state.db, &username).await?.is_none() {
            break;
        }
        username = format!("alice{n}");
    }
    let title = "Hello, events";
    let slug = posts::free_slug(&state.db, title).await?;
    Ok(vec![
        Step {
            method: "POST",
            path: "/users".into(),
            body: Some(json!({ "username": username, "email": format!("{username}@example.com") })),
            note: "201, the new user",
        },
        Step {
            method: "POST",
            path: "/posts".into(),
            body: Some(json!({ "title": title, "body": "First post", "author": username })),
            note: "201, a draft",
        },
        Step {
            method: "POST",
            path: format!("/posts/{slug}/publish"),
            body: None,
            note: "200, published: true",
        },
        Step {
            method: "GET",
            path: "/search?q=hello".into(),
            body: None,
            note: "the post among the hits",
        },
        Step {
            method: "GET",
            path: format!("/posts/{slug}"),
            body: None,
            note: "twice: x-cache: miss, then hit",
        },
    ])
}

/// A few users and posts, created through the same code as the API, so their
/// events index and cache them like any other.
pub(crate) async fn seed(state: &AppState) -> Result<(), ApiError> {
    let posts = [
        (
            "ada",
            "Notes on the Analytical Engine",
            "It weaves algebraic patterns.",
            true,
        ),
        (
            "grace",
            "Debugging the Mark II",
            "We found a moth in relay 70.",
            true,
        ),
        (
            "linus",
            "Just a hobby",
            "It won't be big and professional.",
            false,
        ),
    ];
    for (username, title, body, published) in posts {
        let user = match create_user(
            state,
            NewUser {
                username: username.into(),
                email: format!("{username}@example.com"),
            },
        )
        .await
        {
            Ok(user) => user,
            // Seeded on an earlier run.
            Err(ApiError::Conflict(_)) => continue,
            Err(error) => return Err(error),
        };
        let post = create_post(
            state,
            NewPost {
                title: title.into(),
                body: body.into(),
                author_id: Some(user.id),
                author: None,
            },
        )
        .await?;
        if published {
            publish_post(state, post.id).await?;
        }
    }
    state.idle().await.map_err(super::write::store_error)?;
    Ok(())
}
