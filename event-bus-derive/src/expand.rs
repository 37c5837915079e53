//! Code generation for `#[derive(DomainEvent)]`.

use std::collections::HashSet;

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::{DeriveInput, Ident, LitStr, Path};

use crate::ast::{Input, Shape, Variant};
use crate::ctxt::Ctxt;
use crate::valid;

pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let cx = Ctxt::default();
    let expanded = match Input::from_syn(&cx, input) {
        Some(ast) => {
            valid::check(&cx, &ast);
            if ast.original.generics.params.is_empty() {
                expand(&ast)
            } else {
                // Every generated item would need the enum's parameters;
                // the error alone says what to change.
                TokenStream::new()
            }
        }
        None => stub(input),
    };
    match cx.check() {
        Ok(()) => expanded,
        Err(errors) => {
            let errors = errors.to_compile_error();
            quote!(#errors #expanded)
        }
    }
}

/// For a struct or union: an `Event` impl that keeps the user's other uses of
/// the type from failing too, beside the error that says what to fix.
fn stub(input: &DeriveInput) -> TokenStream {
    let ident = &input.ident;
    let private = private_path(&default_crate());
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    quote! {
        #[automatically_derived]
        impl #impl_generics #private::Event for #ident #ty_generics #where_clause {
            type Kind = #private::StubKind;

            fn kind(&self) -> #private::StubKind {
                ::core::panic!("`DomainEvent` was derived for a type that is not an enum")
            }
        }
    }
}

fn default_crate() -> Path {
    syn::parse_quote!(::event_bus)
}

fn private_path(krate: &Path) -> TokenStream {
    quote!(#krate::__private)
}

/// Everything the derive generates for a valid (or mostly valid) enum.
struct Expander<'a> {
    input: &'a Input<'a>,
    private: TokenStream,
    event: &'a Ident,
    kind: Ident,
}

fn expand(input: &Input<'_>) -> TokenStream {
    let krate = input.attrs.krate.clone().unwrap_or_else(default_crate);
    let expander = Expander {
        input,
        private: private_path(&krate),
        event: input.ident,
        kind: input.kind_ident(),
    };
    let kind_enum = expander.kind_enum();
    let event_impl = expander.event_impl();
    let emitter = expander.emitter();
    let handler = expander.handler();
    let routes = expander.routes();
    let batch_handler = expander.batch_handler();
    let batch_routes = expander.batch_routes();
    quote! {
        #kind_enum
        #event_impl
        #emitter
        #handler
        #routes
        #batch_handler
        #batch_routes
    }
}

impl Expander<'_> {
    fn kind_enum(&self) -> TokenStream {
        let Self {
            private,
            event,
            kind,
            ..
        } = self;
        let vis = self.input.vis;
        let variants = &self.input.variants;
        let idents: Vec<&Ident> = variants.iter().map(|v| v.ident).collect();
        let names: Vec<String> = variants.iter().map(Variant::name).collect();
        let indices = 0..variants.len();
        let enum_doc = format!("The kind of each [`{event}`]: one fieldless variant per event.");
        let variant_docs = variants
            .iter()
            .map(|v| format!("`{}`: the kind of [`{event}::{}`].", v.name(), v.ident));
        // Written only when a variant sets one, so the common case keeps the
        // trait's default.
        let priority = variants
            .iter()
            .any(|v| v.attrs.priority.is_some())
            .then(|| {
                let levels = variants.iter().map(|v| {
                    v.attrs
                        .priority
                        .clone()
                        .unwrap_or_else(|| Ident::new("Normal", Span::call_site()))
                });
                quote! {
                    fn priority(self) -> #private::Priority {
                        match self {
                            #(Self::#idents => #private::Priority::#levels,)*
                        }
                    }
                }
            });
        // A `match` on names and aliases. Each string leads to its first
        // variant only: a duplicate is already an error, and must not add
        // an unreachable-pattern warning to it.
        let mut taken = HashSet::new();
        let lookup = variants.iter().filter_map(|v| {
            let ident = v.ident;
            let strings: Vec<String> = std::iter::once(v.name())
                .chain(v.attrs.aliases.iter().map(LitStr::value))
                .filter(|string| taken.insert(string.clone()))
                .collect();
            (!strings.is_empty())
                .then(|| quote!(#(#strings)|* => #private::Option::Some(Self::#ident)))
        });
        // Like `priority`, written only when a variant has one.
        let aliases = variants
            .iter()
            .any(|v| !v.attrs.aliases.is_empty())
            .then(|| {
                let lists = variants.iter().map(|v| {
                    let aliases = &v.attrs.aliases;
                    quote!(&[#(#aliases),*])
                });
                quote! {
                    fn aliases(self) -> &'static [&'static str] {
                        match self {
                            #(Self::#idents => #lists,)*
                        }
                    }
                }
            });
        // The kind enum mirrors the event enum's variants, so a lint the user
        // allowed on the enum (`clippy::enum_variant_names`, say) would fire
        // on it where they cannot reach it: it carries the same lint levels.
        let lints = self.input.original.attrs.iter().filter(|attr| {
            ["allow", "expect", "warn", "deny", "forbid"]
                .iter()
                .any(|level| attr.path().is_ident(level))
        });
        quote! {
            #[doc = #enum_doc]
            #(#lints)*
            #[derive(
                ::core::fmt::Debug,
                ::core::clone::Clone,
                ::core::marker::Copy,
                ::core::cmp::PartialEq,
                ::core::cmp::Eq,
                ::core::cmp::PartialOrd,
                ::core::cmp::Ord,
                ::core::hash::Hash,
            )]
            #vis enum #kind {
                #(
                    #[doc = #variant_docs]
                    #idents,
                )*
            }

            #[automatically_derived]
            impl #private::EventKind for #kind {
                const ALL: &'static [Self] = &[#(Self::#idents),*];

                #[inline]
                fn index(self) -> usize {
                    match self {
                        #(Self::#idents => #indices,)*
                    }
                }

                fn name(self) -> &'static str {
                    match self {
                        #(Self::#idents => #names,)*
                    }
                }

                fn from_name(name: &str) -> #private::Option<Self> {
                    match name {
                        #(#lookup,)*
                        _ => #private::Option::None,
                    }
                }

                #aliases

                #priority
            }
        }
    }

    fn event_impl(&self) -> TokenStream {
        let Self {
            private,
            event,
            kind,
            ..
        } = self;
        let arms = self.input.variants.iter().map(|v| {
            let ident = v.ident;
            let pattern = match v.shape {
                Shape::Unit => quote!(Self::#ident),
                Shape::Newtype(_) | Shape::Tuple(_) => quote!(Self::#ident(..)),
                Shape::Struct(_) => quote!(Self::#ident { .. }),
            };
            quote!(#pattern => #kind::#ident)
        });
        quote! {
            #[automatically_derived]
            impl #private::Event for #event {
                type Kind = #kind;

                #[inline]
                fn kind(&self) -> #kind {
                    match *self {
                        #(#arms,)*
                    }
                }
            }
        }
    }

    fn emitter(&self) -> TokenStream {
        let Self { private, event, .. } = self;
        let vis = self.input.vis;
        let emitter = self.input.emitter_ident();
        let publish = quote!(#private::Publish<#event>);
        let helpers = self
            .input
            .variants
            .iter()
            .filter(|v| v.attrs.skip_emit.is_none())
            .filter_map(|v| {
                let ident = v.ident;
                let span = ident.span();
                let emit = format_ident!("emit_{}", v.snake(), span = span);
                let emit_wait = format_ident!("emit_{}_wait", v.snake(), span = span);
                let (params, construct) = match &v.shape {
                    Shape::Unit => (quote!(), quote!(#event::#ident)),
                    // A literal cannot pick among `impl Into<u64>`'s sources,
                    // so primitives are taken as they are: `emit_x(1)` works.
                    Shape::Newtype(ty) if is_primitive(ty) => {
                        (quote!(data: #ty), quote!(#event::#ident(data)))
                    }
                    Shape::Newtype(ty) => (
                        quote!(data: impl ::core::convert::Into<#ty>),
                        quote!(#event::#ident(::core::convert::Into::into(data))),
                    ),
                    Shape::Struct(fields) => {
                        let names = fields.iter().map(|(name, _)| name);
                        let params = fields.iter().map(|(name, ty)| quote!(#name: #ty));
                        (quote!(#(#params),*), quote!(#event::#ident { #(#names),* }))
                    }
                    Shape::Tuple(_) => return None,
                };
                let doc = format!(
                    "Emits [`{event}::{ident}`] (`{}`): never blocks, never fails. See `Publish::publish`; on a bus, `EventBus::emit`.",
                    v.name(),
                );
                let wait_doc = format!(
                    "Emits [`{event}::{ident}`] (`{}`), first waiting for room where the publisher has a notion of it. See `Publish::publish_wait`; on a bus, `EventBus::emit_wait`, which waits for backpressure subscribers.",
                    v.name(),
                );
                Some(quote_spanned! {span=>
                    #[doc = #doc]
                    #[inline]
                    fn #emit(&self, #params) {
                        <Self as #publish>::publish(self, #construct)
                    }

                    #[doc = #wait_doc]
                    #[inline]
                    fn #emit_wait(&self, #params) -> impl #private::Future<Output = ()> + ::core::marker::Send {
                        let event = #construct;
                        <Self as #publish>::publish_wait(self, event)
                    }
                })
            });
        let doc = format!(
            "Emit helpers for [`{event}`], one per variant, on anything that implements `Publish<{event}>`: the bus itself, the application's state once it implements `AsRef<EventBus<{event}>>`, or a publisher of its own, such as an outbox transaction."
        );
        // A helper the application does not call is not dead code it wrote.
        quote! {
            #[doc = #doc]
            #[allow(dead_code, clippy::too_many_arguments)]
            #vis trait #emitter: #publish {
                #(#helpers)*
            }

            #[automatically_derived]
            impl<__T: #publish + ?::core::marker::Sized> #emitter for __T {}
        }
    }

    fn handler(&self) -> TokenStream {
        let Self { private, event, .. } = self;
        let vis = self.input.vis;
        let handler = self.input.handler_ident();
        let result = quote!(#private::Result<(), #private::HandlerError>);
        let output = quote!(impl #private::Future<Output = #result> + ::core::marker::Send);
        let methods = self.input.variants.iter().filter_map(|v| {
            let ident = v.ident;
            let method = on_method(v);
            let params = match &v.shape {
                Shape::Unit => quote!(),
                Shape::Newtype(ty) => quote!(data: &#ty,),
                Shape::Struct(fields) => {
                    let params = fields.iter().map(|(name, ty)| quote!(#name: &#ty,));
                    quote!(#(#params)*)
                }
                Shape::Tuple(_) => return None,
            };
            let doc = format!(
                "Handles `{}` ([`{event}::{ident}`]); `meta` has the event's id and the attempt. Unless implemented, does nothing, and a `#[listener]` is not subscribed to it. Under `#[listener]`, an implementation may leave `meta` out.",
                v.name()
            );
            Some(quote_spanned! {ident.span()=>
                #[doc = #doc]
                #[allow(unused_variables)]
                fn #method(&self, #params meta: #private::Meta) -> #output {
                    async { #private::Result::Ok(()) }
                }
            })
        });
        let arms = self.input.variants.iter().map(|v| {
            let ident = v.ident;
            let method = on_method(v);
            match &v.shape {
                Shape::Unit => quote!(#event::#ident => self.#method(meta).await),
                Shape::Newtype(_) => {
                    quote!(#event::#ident(ref data) => self.#method(data, meta).await)
                }
                Shape::Struct(fields) => {
                    let names: Vec<_> = fields.iter().map(|(name, _)| name).collect();
                    quote!(#event::#ident { #(ref #names),* } => self.#method(#(#names,)* meta).await)
                }
                Shape::Tuple(_) => quote!(#event::#ident(..) => #private::Result::Ok(())),
            }
        });
        let doc = format!(
            "Handles [`{event}`]s: one `on_*` method per variant, each doing nothing until implemented.\n\n\
             Implement the methods for the events a listener wants in an `impl` block marked \
             `#[event_bus::listener]`; the listener is then subscribed to exactly those kinds \
             and can be spawned with `EventBus::spawn`."
        );
        quote! {
            #[doc = #doc]
            // Fields are passed as they are declared (`&String`, many of them).
            #[allow(dead_code, clippy::ptr_arg, clippy::too_many_arguments)]
            #vis trait #handler: ::core::marker::Send + ::core::marker::Sync + 'static {
                #(#methods)*

                /// Calls the method of `event`'s variant with `meta`: the
                /// exhaustive `match` the derive writes.
                fn dispatch(&self, event: &#event, meta: #private::Meta) -> #output {
                    async move {
                        // On the place, not the reference, so that an enum
                        // without variants still matches exhaustively.
                        match *event {
                            #(#arms,)*
                        }
                    }
                }
            }
        }
    }

    /// `kind_of`, shared by the `Routes` and `BatchRoutes` impls: the kind
    /// of each `on_*` method name.
    fn kind_of(&self) -> TokenStream {
        let Self { private, kind, .. } = self;
        let (methods, idents): (Vec<String>, Vec<&Ident>) = self
            .input
            .variants
            .iter()
            .map(|v| (on_method(v).to_string(), v.ident))
            .unzip();
        quote! {
            fn kind_of(method: &str) -> #private::Option<#kind> {
                match method {
                    #(#methods => #private::Option::Some(#kind::#idents),)*
                    _ => #private::Option::None,
                }
            }
        }
    }

    fn routes(&self) -> TokenStream {
        let Self { private, event, .. } = self;
        let handler = self.input.handler_ident();
        let kind_of = self.kind_of();
        quote! {
            #[automatically_derived]
            impl<__H: #handler + ?::core::marker::Sized> #private::Routes<__H> for #event {
                #kind_of

                fn route<'a>(
                    handler: &'a __H,
                    event: &'a Self,
                    meta: #private::Meta,
                ) -> impl #private::Future<Output = #private::Result<(), #private::HandlerError>>
                       + ::core::marker::Send
                       + 'a {
                    #handler::dispatch(handler, event, meta)
                }
            }
        }
    }
}

impl Expander<'_> {
    /// The batch handler trait: one `on_*` method per variant, taking the
    /// payloads of a run of events of that kind, and `dispatch_batch`, which
    /// splits a batch into such runs.
    fn batch_handler(&self) -> TokenStream {
        let Self { private, event, .. } = self;
        let vis = self.input.vis;
        let batch_handler = self.input.batch_handler_ident();
        let result = quote!(#private::Result<(), #private::BatchError>);
        let output = quote!(impl #private::Future<Output = #result> + ::core::marker::Send);
        let methods = self.input.variants.iter().filter_map(|v| {
            let ident = v.ident;
            let method = on_method(v);
            let param = match &v.shape {
                Shape::Unit => quote!(count: usize),
                Shape::Newtype(ty) => quote!(batch: &[&#ty]),
                Shape::Struct(fields) if fields.len() == 1 => {
                    let ty = &fields[0].1;
                    quote!(batch: &[&#ty])
                }
                Shape::Struct(fields) => {
                    let types = fields.iter().map(|(_, ty)| quote!(&#ty));
                    quote!(batch: &[(#(#types),*)])
                }
                Shape::Tuple(_) => return None,
            };
            let doc = match &v.shape {
                Shape::Unit => format!(
                    "Handles a run of `count` consecutive events `{}` ([`{event}::{ident}`]) of a batch. Unless implemented, does nothing, and a `#[listener]` is not subscribed to it.",
                    v.name()
                ),
                _ => format!(
                    "Handles the payloads of a run of consecutive events `{}` ([`{event}::{ident}`]) of a batch, in order; a `BatchError` names failed ones by their index in `batch`. Unless implemented, does nothing, and a `#[listener]` is not subscribed to it.",
                    v.name()
                ),
            };
            let doc = format!(
                "{doc} `metas` has each event's id and the attempt, in the same order; under `#[listener]`, an implementation may leave it out."
            );
            Some(quote_spanned! {ident.span()=>
                #[doc = #doc]
                #[allow(unused_variables)]
                fn #method(&self, #param, metas: &[#private::Meta]) -> #output {
                    async { #private::Result::Ok(()) }
                }
            })
        });
        // Each arm handles `run`, a run of events of its variant's kind.
        let arms = self.input.variants.iter().map(|v| {
            let ident = v.ident;
            let method = on_method(v);
            let (pattern, item) = match &v.shape {
                Shape::Unit => {
                    return quote!(#event::#ident => self.#method(run.len(), &metas).await);
                }
                Shape::Newtype(_) => (quote!(#event::#ident(ref __data)), quote!(__data)),
                Shape::Struct(fields) => {
                    let names: Vec<_> = fields.iter().map(|(name, _)| name).collect();
                    // Bound under names of their own, so that a field cannot
                    // shadow the dispatcher's variables.
                    let bound: Vec<Ident> = names
                        .iter()
                        .map(|name| format_ident!("__field_{}", name))
                        .collect();
                    let item = if bound.len() == 1 {
                        quote!(#(#bound)*)
                    } else {
                        quote!((#(#bound),*))
                    };
                    (quote!(#event::#ident { #(#names: ref #bound),* }), item)
                }
                Shape::Tuple(_) => {
                    return quote!(#event::#ident(..) => #private::Result::Ok(()));
                }
            };
            quote! {
                #event::#ident { .. } => {
                    let items: #private::Vec<_> = run
                        .iter()
                        .filter_map(|__envelope| match *__envelope.event() {
                            #pattern => #private::Option::Some(#item),
                            _ => #private::Option::None,
                        })
                        .collect();
                    self.#method(&items, &metas).await
                }
            }
        });
        let doc = format!(
            "Handles [`{event}`]s in batches: one `on_*` method per variant, each taking the payloads of a run of consecutive events of its kind in a batch and doing nothing until implemented. The runs are handed over in batch order, so events are handled in the order they were delivered.\n\n\
             Implement the methods for the events a listener wants in an `impl` block marked \
             `#[event_bus::listener]`; the listener is then a `BatchListener` subscribed to \
             exactly those kinds, to be spawned with `EventBus::spawn`."
        );
        quote! {
            #[doc = #doc]
            #[allow(dead_code, clippy::type_complexity, clippy::too_many_arguments)]
            #vis trait #batch_handler: ::core::marker::Send + ::core::marker::Sync + 'static {
                #(#methods)*

                /// Calls the method of each run of consecutive events of one
                /// kind in `batch`, in batch order, with that run's payloads:
                /// `[a, b, a]` is `a`'s method with one payload, then `b`'s,
                /// then `a`'s again, so the events are handled in the order
                /// they were delivered. The failures the methods report are
                /// mapped back to `batch`. When the batch's failure mode is
                /// `BatchFailure::StopAtFirst`, no run after the first that
                /// fails is called: the runtime retries from that failure.
                // An enum without variants (already an error) matches nothing.
                #[allow(unreachable_code)]
                fn dispatch_batch(&self, batch: &#private::Batch<#event>) -> #output {
                    async move {
                        let stop_at_first = #private::Batch::failure_mode(batch)
                            == #private::BatchFailure::StopAtFirst;
                        let attempts = #private::Batch::attempts(batch);
                        let batch = #private::Batch::events(batch);
                        let kind = |envelope: &#private::Arc<#private::Envelope<#event>>| {
                            #private::EventKind::index(#private::Event::kind(envelope.event()))
                        };
                        let mut failures: #private::Option<#private::BatchError> = #private::Option::None;
                        let mut start = 0;
                        while start < batch.len() {
                            let first = kind(&batch[start]);
                            let end = batch[start..]
                                .iter()
                                .position(|envelope| kind(envelope) != first)
                                .map_or(batch.len(), |len| start + len);
                            let run = &batch[start..end];
                            let metas: #private::Vec<#private::Meta> = run
                                .iter()
                                .zip(&attempts[start..end])
                                .map(|(__envelope, &__attempt)| #private::Meta::new(__envelope, __attempt))
                                .collect();
                            let outcome: #result = match *run[0].event() {
                                #(#arms,)*
                            };
                            if let #private::Result::Err(error) = outcome {
                                let error = error.within(start..end);
                                failures = #private::Option::Some(match failures {
                                    #private::Option::Some(earlier) => earlier.and(error),
                                    #private::Option::None => error,
                                });
                                if stop_at_first {
                                    break;
                                }
                            }
                            start = end;
                        }
                        match failures {
                            #private::Option::Some(error) => #private::Result::Err(error),
                            #private::Option::None => #private::Result::Ok(()),
                        }
                    }
                }
            }
        }
    }

    fn batch_routes(&self) -> TokenStream {
        let Self { private, event, .. } = self;
        let batch_handler = self.input.batch_handler_ident();
        let kind_of = self.kind_of();
        quote! {
            #[automatically_derived]
            impl<__H: #batch_handler + ?::core::marker::Sized> #private::BatchRoutes<__H> for #event {
                #kind_of

                fn route_batch<'a>(
                    handler: &'a __H,
                    batch: &'a #private::Batch<Self>,
                ) -> impl #private::Future<Output = #private::Result<(), #private::BatchError>>
                       + ::core::marker::Send
                       + 'a {
                    #batch_handler::dispatch_batch(handler, batch)
                }
            }
        }
    }
}

/// `on_user_created`, spanned at the variant so errors in generated handler
/// code point at it.
fn on_method(variant: &Variant<'_>) -> Ident {
    Ident::new(
        &format!("on_{}", variant.snake()),
        variant.ident.span().resolved_at(Span::call_site()),
    )
}

/// Whether `ty` is a primitive number, `bool` or `char`.
fn is_primitive(ty: &syn::Type) -> bool {
    const PRIMITIVES: &[&str] = &[
        "u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128", "isize",
        "f32", "f64", "bool", "char",
    ];
    match ty {
        syn::Type::Path(path) if path.qself.is_none() => path
            .path
            .get_ident()
            .is_some_and(|ident| PRIMITIVES.contains(&ident.to_string().as_str())),
        _ => false,
    }
}
