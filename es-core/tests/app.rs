//! `App`, the composition root: a saga wired by it takes its inputs from the
//! bus, fires its deadlines, and its commands reach their consumer through
//! the relay, while its own state stays in the store.

#![allow(clippy::unwrap_used)] // tests panic on failure

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use es_core::doc_support::reminder::{Reminder, ReminderInput};
use es_core::{App, BusError, Delivery, ManualClock, MessageHandler, Outcome, Subscription};

/// The types of the messages a consumer was handed.
type Received = Arc<Mutex<Vec<String>>>;

/// A handler that keeps the type of every message in `received`.
fn recorder(received: &Received) -> impl MessageHandler {
    let received = Arc::clone(received);
    move |delivery: Delivery| {
        let received = Arc::clone(&received);
        async move {
            let kind = delivery.message.message_type.to_string();
            received.lock().unwrap().push(kind);
            Outcome::Ack
        }
    }
}

fn types(received: &Received) -> Vec<String> {
    received.lock().unwrap().clone()
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..1_000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{what} did not happen within 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wired_saga_reacts_fires_its_deadline_and_its_command_reaches_its_consumer() {
    let clock = Arc::new(ManualClock::at(Utc::now()));
    let mut app = App::in_memory("test").with_clock(clock.clone());
    let people = Received::default();
    app.commands("people", "people", recorder(&people))
        .await
        .unwrap();
    let saga_state = Received::default();
    let spy = Subscription::new("spy", ["reminder.*"]);
    app.consume(spy, Arc::new(recorder(&saga_state)))
        .await
        .unwrap();
    let reminders = app
        .saga::<Reminder>("reminders")
        .inputs_from("reminders")
        .deadline_tick(Some(Duration::from_millis(10)))
        .start()
        .await
        .unwrap();
    app.start();

    let saga = uuid::Uuid::now_v7();
    app.bus()
        .publish(&[ReminderInput::Started.to(saga)])
        .await
        .unwrap();
    for _ in 0..1_000 {
        if reminders.load(saga).await.unwrap().state.waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(reminders.load(saga).await.unwrap().state.waiting);
    assert!(types(&people).is_empty(), "nothing is due yet");

    clock.advance(Duration::from_secs(31));
    eventually("the nudge", || !types(&people).is_empty()).await;
    assert_eq!(types(&people), ["Nudge"]);
    assert!(reminders.load(saga).await.unwrap().state.done);
    assert!(
        types(&saga_state).is_empty(),
        "the saga's state stays in the store: {:?}",
        types(&saga_state)
    );
    app.stop().await;
}

#[tokio::test]
async fn a_saga_that_binds_nothing_is_refused() {
    let mut app = App::in_memory("test");
    let unbound = app.saga::<Reminder>("reminders").start().await;
    assert!(
        matches!(unbound, Err(BusError::InvalidSubscription { ref group, .. }) if group == "reminders"),
        "{unbound:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_dropped_app_stops_its_tasks() {
    let mut app = App::in_memory("test");
    let (stopped, waiting) = tokio::sync::oneshot::channel::<()>();
    let mut stopped = Some(stopped);
    app.supervise("waiter", move |stop| {
        let stopped = stopped.take();
        async move {
            stop.cancelled().await;
            if let Some(stopped) = stopped {
                let _ = stopped.send(());
            }
            Ok::<(), String>(())
        }
    });
    drop(app);
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the task saw the app stop")
        .unwrap();
}
