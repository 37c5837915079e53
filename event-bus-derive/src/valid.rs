//! Checks on the parsed input. Every problem is reported into the context;
//! none stops the others from being found.

use std::collections::HashMap;

use crate::ast::{Input, Shape};
use crate::ctxt::Ctxt;

pub(crate) fn check(cx: &Ctxt, input: &Input<'_>) {
    check_generics(cx, input);
    check_variants(cx, input);
    let names = check_names(cx, input);
    check_aliases(cx, input, &names);
    check_methods(cx, input);
}

fn check_generics(cx: &Ctxt, input: &Input<'_>) {
    let generics = &input.original.generics;
    if !generics.params.is_empty() || generics.where_clause.is_some() {
        cx.error_spanned_by(
            generics,
            "`DomainEvent` does not support generic enums; give the event enum concrete payload types",
        );
    }
}

fn check_variants(cx: &Ctxt, input: &Input<'_>) {
    if input.variants.is_empty() {
        cx.error_spanned_by(
            input.ident,
            "`DomainEvent` needs at least one variant; an enum without variants has no event to emit",
        );
    }
    for variant in &input.variants {
        if let Shape::Tuple(fields) = variant.shape {
            cx.error_spanned_by(
                fields,
                format!(
                    "a tuple variant must carry exactly one payload; use a struct variant for several fields, like `{} {{ id: u64, name: String }}`",
                    variant.ident
                ),
            );
        }
    }
}

/// Checks every event name; returns the valid ones with their variants.
fn check_names<'a>(cx: &Ctxt, input: &Input<'a>) -> HashMap<String, &'a syn::Ident> {
    let mut seen: HashMap<String, &syn::Ident> = HashMap::new();
    for variant in &input.variants {
        let name = variant.name();
        if let Some(problem) = name_problem(&name) {
            cx.syn_error(syn::Error::new(
                variant.name_span(),
                format!(
                    "invalid event name `{name}`: {problem}; use lowercase words separated by dots, like `user.created`"
                ),
            ));
            continue;
        }
        if let Some(first) = seen.get(&name) {
            cx.syn_error(syn::Error::new(
                variant.name_span(),
                format!(
                    "event name `{name}` is already used by variant `{first}`; give one of them another name with `#[event(name = \"…\")]`"
                ),
            ));
        } else {
            seen.insert(name, variant.ident);
        }
    }
    seen
}

/// An alias is read as its variant's name, so it must be a valid name that
/// no variant has and no other alias is.
fn check_aliases(cx: &Ctxt, input: &Input<'_>, names: &HashMap<String, &syn::Ident>) {
    let mut seen: HashMap<String, &syn::Ident> = HashMap::new();
    for variant in &input.variants {
        for alias in &variant.attrs.aliases {
            let value = alias.value();
            if let Some(problem) = name_problem(&value) {
                cx.error_spanned_by(
                    alias,
                    format!(
                        "invalid event alias `{value}`: {problem}; an alias is a former event name, lowercase words separated by dots, like `user.registered`"
                    ),
                );
            } else if let Some(&owner) = names.get(&value) {
                let fix = if owner == variant.ident {
                    "remove the alias: an event is always read under its own name".to_owned()
                } else {
                    format!(
                        "remove the alias, or give `{owner}` another name with `#[event(name = \"…\")]`"
                    )
                };
                cx.error_spanned_by(
                    alias,
                    format!("alias `{value}` is already the name of `{owner}`; {fix}"),
                );
            } else if let Some(&owner) = seen.get(&value) {
                cx.error_spanned_by(
                    alias,
                    format!(
                        "alias `{value}` is already an alias of `{owner}`; remove one of them: an old name can lead to one variant only"
                    ),
                );
            } else {
                seen.insert(value, variant.ident);
            }
        }
    }
}

/// Why `name` is not a valid event name, if it is not.
fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    for segment in name.split('.') {
        if segment.is_empty() {
            return Some("it has an empty segment");
        }
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
        if !segment.chars().all(valid) {
            return Some("it may only contain lowercase ASCII letters, digits, `_`, `-` and `.`");
        }
    }
    None
}

fn check_methods(cx: &Ctxt, input: &Input<'_>) {
    let mut seen: HashMap<String, &syn::Ident> = HashMap::new();
    for variant in &input.variants {
        let snake = variant.snake();
        if let Some(first) = seen.get(&snake) {
            cx.error_spanned_by(
                variant.ident,
                format!(
                    "variants `{first}` and `{}` both make the handler method `on_{snake}`; rename one of them",
                    variant.ident
                ),
            );
        } else {
            seen.insert(snake, variant.ident);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::name_problem;

    #[test]
    fn event_names_are_dotted_lowercase_words() {
        for valid in [
            "user.created",
            "post",
            "v2.user-deleted",
            "cache_flushed.all",
        ] {
            assert_eq!(name_problem(valid), None, "{valid}");
        }
        for invalid in [
            "",
            "User.created",
            "user..created",
            ".user",
            "user created",
            "user/created",
        ] {
            assert!(name_problem(invalid).is_some(), "{invalid}");
        }
    }
}
