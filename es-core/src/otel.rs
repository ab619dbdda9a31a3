//! Spans exported with OpenTelemetry (feature `otel`): the glue between the
//! [`TraceParent`] every event and message carries and the spans of
//! `tracing-opentelemetry`.
//!
//! The framework's spans (a command, a store append, a relay's publish, a
//! bus delivery, a saga's reaction, a projection's apply) call
//! [`continue_trace`] with the trace context their event or message carries,
//! so that an exported span is the child of the span that produced its input,
//! in whatever process that ran; what they produce carries [`current`] as its
//! traceparent, so that the next hop's span is their child.
//!
//! Without the feature, or when no `tracing_opentelemetry` layer sees the
//! span, every function here does nothing and answers `None`: the callers
//! then keep the trace context as they have it, and a [`TraceParent`] still
//! follows an order through every service, in the logs only.

use tracing::Span;

use crate::TraceParent;

/// Makes `span` continue the trace `parent` (the traceparent of the event
/// or message it handles), and answers `span`'s own context: the
/// traceparent for what is produced under it.
///
/// The span keeps the parent it has when that parent is a span of the same
/// trace (the usual case in one process: a command run while its message is
/// handled); otherwise its parent becomes `parent`, a span that may be in
/// another process. Call it right after creating the span, before the span
/// is first entered.
///
/// `None` when `span` is not exported: the feature is off, no OpenTelemetry
/// layer is installed, or the span is filtered out.
#[inline]
pub fn continue_trace(span: &Span, parent: Option<TraceParent>) -> Option<TraceParent> {
    imp::continue_trace(span, parent)
}

/// Makes `span`, the span of a batch of work (a relay's publish, a
/// projection's batch), continue the trace of the items it handles: the
/// child of the first item's span when they are all in one trace, else a
/// root linked to each item's span (up to [`MAX_LINKS`]). Answers `span`'s
/// own context, as [`continue_trace`] does.
#[inline]
pub fn continue_batch(
    span: &Span,
    parents: impl IntoIterator<Item = Option<TraceParent>>,
) -> Option<TraceParent> {
    imp::continue_batch(span, parents)
}

/// At most this many links on a batch's span whose items are in several
/// traces.
pub const MAX_LINKS: usize = 32;

/// The context of the innermost exported span the caller runs in: the
/// traceparent for what it produces. `None` when there is none (see
/// [`continue_trace`]).
#[inline]
pub fn current() -> Option<TraceParent> {
    imp::current()
}

/// `metadata` naming the innermost exported span the caller runs in as its
/// trace context ([`current`]), or `metadata` as it is when there is none:
/// what an event, record or message produced here carries.
pub fn traced(metadata: &crate::Metadata) -> std::borrow::Cow<'_, crate::Metadata> {
    match current() {
        Some(traceparent) => {
            std::borrow::Cow::Owned(metadata.clone().with_traceparent(traceparent))
        }
        None => std::borrow::Cow::Borrowed(metadata),
    }
}

/// [`traced`] for metadata the caller owns: no copy is made.
pub fn traced_owned(metadata: crate::Metadata) -> crate::Metadata {
    match current() {
        Some(traceparent) => metadata.with_traceparent(traceparent),
        None => metadata,
    }
}

/// The trace context of `span` when it is exported, else `None`.
#[inline]
pub fn context_of(span: &Span) -> Option<TraceParent> {
    imp::context_of(span)
}

#[cfg(feature = "otel")]
mod imp {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::Context;
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::MAX_LINKS;
    use crate::TraceParent;

    /// The remote span context `parent` names.
    fn remote(parent: TraceParent) -> SpanContext {
        let (trace_id, span_id, flags) = parent.parts();
        SpanContext::new(
            TraceId::from(trace_id),
            SpanId::from(span_id),
            TraceFlags::new(flags),
            true,
            TraceState::NONE,
        )
    }

    /// The traceparent of a span context; `None` when it is not valid.
    fn of(context: &SpanContext) -> Option<TraceParent> {
        if !context.is_valid() {
            return None;
        }
        TraceParent::from_parts(
            u128::from_be_bytes(context.trace_id().to_bytes()),
            u64::from_be_bytes(context.span_id().to_bytes()),
            context.trace_flags().to_u8(),
        )
    }

    /// Whether the context the caller runs in is a span of `parent`'s trace.
    fn within(parent: TraceParent) -> bool {
        let current = Context::current();
        let span = current.span();
        let context = span.span_context();
        context.is_valid() && u128::from_be_bytes(context.trace_id().to_bytes()) == parent.parts().0
    }

    pub(super) fn continue_trace(span: &Span, parent: Option<TraceParent>) -> Option<TraceParent> {
        if span.is_disabled() {
            return None;
        }
        if let Some(parent) = parent {
            if !within(parent) {
                // Fails only when no OpenTelemetry layer sees the span, or
                // it was entered already: then it keeps the parent it has.
                let _ = span.set_parent(Context::new().with_remote_span_context(remote(parent)));
            }
        }
        context_of(span)
    }

    pub(super) fn continue_batch(
        span: &Span,
        parents: impl IntoIterator<Item = Option<TraceParent>>,
    ) -> Option<TraceParent> {
        if span.is_disabled() {
            return None;
        }
        // The first item's context, and those of other traces (distinct,
        // as many as can be linked besides the first).
        let mut first: Option<TraceParent> = None;
        let mut others: Vec<TraceParent> = Vec::new();
        for parent in parents.into_iter().flatten() {
            match first {
                None => first = Some(parent),
                Some(f) if f.parts().0 == parent.parts().0 => {}
                Some(_) if others.len() + 1 < MAX_LINKS && !others.contains(&parent) => {
                    others.push(parent);
                }
                Some(_) => {}
            }
        }
        match first {
            Some(first) if others.is_empty() => continue_trace(span, Some(first)),
            Some(first) => {
                for parent in std::iter::once(first).chain(others) {
                    span.add_link(remote(parent));
                }
                context_of(span)
            }
            None => context_of(span),
        }
    }

    pub(super) fn current() -> Option<TraceParent> {
        let current = Context::current();
        let span = current.span();
        of(span.span_context())
    }

    pub(super) fn context_of(span: &Span) -> Option<TraceParent> {
        if span.is_disabled() {
            return None;
        }
        let context = span.context();
        let own = context.span();
        of(own.span_context())
    }
}

#[cfg(not(feature = "otel"))]
mod imp {
    use tracing::Span;

    use crate::TraceParent;

    #[inline]
    pub(super) fn continue_trace(_: &Span, _: Option<TraceParent>) -> Option<TraceParent> {
        None
    }

    #[inline]
    pub(super) fn continue_batch(
        _: &Span,
        _: impl IntoIterator<Item = Option<TraceParent>>,
    ) -> Option<TraceParent> {
        None
    }

    #[inline]
    pub(super) fn current() -> Option<TraceParent> {
        None
    }

    #[inline]
    pub(super) fn context_of(_: &Span) -> Option<TraceParent> {
        None
    }
}

#[cfg(all(test, feature = "otel"))]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt;

    use super::{continue_batch, continue_trace, current};
    use crate::TraceParent;

    fn traced<T>(f: impl FnOnce() -> T) -> (T, Vec<opentelemetry_sdk::trace::SpanData>) {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = tracing_subscriber::registry().with(layer);
        let out = tracing::subscriber::with_default(subscriber, f);
        let _ = provider.force_flush();
        (out, exporter.get_finished_spans().unwrap_or_default())
    }

    #[test]
    fn a_span_continues_its_inputs_trace_and_names_itself_for_its_outputs() {
        let parent = TraceParent::new_root();
        let ((own, inner), spans) = traced(|| {
            let span = tracing::info_span!("handle");
            let own = continue_trace(&span, Some(parent)).unwrap();
            let inner = span.in_scope(|| {
                // A child in the same trace keeps its tracing parent.
                let child = tracing::info_span!("command");
                let inner = continue_trace(&child, Some(parent)).unwrap();
                assert_eq!(child.in_scope(current), Some(inner));
                inner
            });
            (own, inner)
        });
        assert_eq!(own.trace_id(), parent.trace_id());
        assert_eq!(inner.trace_id(), parent.trace_id());
        let handle = spans.iter().find(|s| s.name == "handle").unwrap();
        let command = spans.iter().find(|s| s.name == "command").unwrap();
        assert_eq!(format!("{}", handle.parent_span_id), parent.span_id());
        assert_eq!(command.parent_span_id, handle.span_context.span_id());
        assert_eq!(
            format!("{}", command.span_context.span_id()),
            inner.span_id()
        );
    }

    #[test]
    fn a_batch_of_one_trace_continues_it_and_of_several_links_them() {
        let a = TraceParent::new_root();
        let b = TraceParent::new_root();
        let ((one, many), spans) = traced(|| {
            let one = tracing::info_span!("one");
            let one = continue_batch(&one, [Some(a), Some(a.child())]).unwrap();
            let many = tracing::info_span!("many");
            let many = continue_batch(&many, [Some(a), None, Some(b)]).unwrap();
            (one, many)
        });
        assert_eq!(one.trace_id(), a.trace_id());
        assert_ne!(many.trace_id(), a.trace_id());
        assert_ne!(many.trace_id(), b.trace_id());
        let many = spans.iter().find(|s| s.name == "many").unwrap();
        assert_eq!(many.links.len(), 2);
    }

    #[test]
    fn nothing_without_a_layer() {
        let span = tracing::info_span!("plain");
        assert_eq!(continue_trace(&span, Some(TraceParent::new_root())), None);
        assert_eq!(current(), None);
    }
}
