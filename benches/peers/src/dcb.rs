//! The DCB scenario (`BENCH_ONLY=dcb`): the course-enrolment decision of the
//! dcb.events course-subscription example (pyeventsourcing's DCB
//! "speedrun"). Courses have places, students a maximum number of courses,
//! and "subscribe student S to course C" succeeds only if C exists and is
//! not full, S exists, is not subscribed to C yet, and has fewer than the
//! maximum courses.
//!
//! The same decision, on the same database, five ways:
//!
//! 1. es-core's `DecisionRunner` on es-postgres's `PgEventStore` (a
//!    `DcbStore`): one read by query (course tag OR student tag), one
//!    conditional append;
//! 2. es-core `Repository`s of a Course and a Student aggregate, two
//!    commands (course, then student, the course's subscription withdrawn
//!    when the student refuses): not atomic;
//! 3. the same two aggregates in one es-core `UnitOfWork`: both loaded, both
//!    decided, one atomic write of both streams expecting the versions read;
//! 4. `disintegrate`'s `DecisionMaker` on its PostgreSQL store (its own
//!    schema, dropped at the end): a `(Course, Student)` state query;
//! 5. as the floor, es-postgres appending the same tagged event with no
//!    read and no condition.
//!
//! Each client works through blocks of its own: 10 courses of 10 places and
//! 10 students of at most 10 courses, registered (one atomic write, not
//! timed) before the block's 100 subscriptions, student by student. All 100
//! succeed, the last ones filling the courses and the students, so a
//! decision folds 2 to 20 events (11 on average) and no state grows from
//! block to block. Clients never share a course or a student: at 16 clients
//! the boundaries are disjoint, and any conflict (a moved boundary, a wrong
//! expected version, a serialization failure) is counted and retried.
//!
//! A side's rate is each client's subscriptions made over the time it spent
//! in them (registrations left out), summed; the sides alternate in slices
//! (`BENCH_SECS` per side and round, in three slices; `ROUNDS`, 3 unless
//! set), the tables analyzed before each slice (see [`Analyze`]). Before
//! measuring, each side is checked to refuse exactly what the rule refuses.

use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use disintegrate::serde::json::Json;
use disintegrate::{NoSnapshot, StateMutate, StateQuery};
use es_core::{
    Aggregate, AppendCondition, AppendResult, DcbStore, Decision, DecisionError, DecisionRunner,
    DomainEvent, EventCodec, EventStore, ExpectedVersion, InvalidTag, Metadata, NewEvent, Position,
    Query, QueryItem, QueryPage, RecordedEvent, Repository, RepositoryError, RetryPolicy,
    StoreError, StreamAppend, StreamEvent, StreamId, Tag, UnitOfWork,
};
use es_postgres::PgEventStore;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::{rounds, secs};

/// `ROUNDS` (see `rounds` in main), 3 when it is not set: the scenario
/// compares five sides, and one round says little about its noise.
fn dcb_rounds() -> usize {
    match std::env::var_os("ROUNDS") {
        Some(_) => rounds(),
        None => 3,
    }
}

/// A course's places.
const PLACES: u32 = 10;
/// The most courses a student may take.
const MAX_COURSES: u32 = 10;
/// Courses (and students) per block.
const BLOCK: usize = 10;
/// The most clients a measurement runs.
const MAX_CLIENTS: usize = 16;

// ---------- the rule, shared by every implementation ----------

/// Why a subscription is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    NoSuchCourse,
    CourseFull,
    AlreadySubscribed,
    NoSuchStudent,
    TooManyCourses,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl std::error::Error for Refusal {}

/// Why a subscription was not made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NotSubscribed {
    /// The rule refused it.
    Refused(Refusal),
    /// Every attempt `RetryPolicy::default()` allows met a conflict.
    GaveUp,
}

impl From<Refusal> for NotSubscribed {
    fn from(refusal: Refusal) -> Self {
        Self::Refused(refusal)
    }
}

/// Adds one to `counter`.
fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The course's half of the rule: it exists, has a free place, and does
/// not have the student yet.
fn course_rule(places: Option<u32>, taken: u32, already: bool) -> Result<(), Refusal> {
    match places {
        None => Err(Refusal::NoSuchCourse),
        Some(places) if taken >= places => Err(Refusal::CourseFull),
        Some(_) if already => Err(Refusal::AlreadySubscribed),
        Some(_) => Ok(()),
    }
}

/// The student's half: they exist and take fewer than their maximum.
fn student_rule(max_courses: Option<u32>, courses: u32) -> Result<(), Refusal> {
    match max_courses {
        None => Err(Refusal::NoSuchStudent),
        Some(max) if courses >= max => Err(Refusal::TooManyCourses),
        Some(_) => Ok(()),
    }
}

fn id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

// ---------- 1. es-core DCB: events tagged course:<id> and student:<id> ----------

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum EnrolmentEvent {
    CourseRegistered { course: String, places: u32 },
    StudentRegistered { student: String, max_courses: u32 },
    StudentSubscribed { student: String, course: String },
}

impl DomainEvent for EnrolmentEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::CourseRegistered { .. } => "CourseRegistered",
            Self::StudentRegistered { .. } => "StudentRegistered",
            Self::StudentSubscribed { .. } => "StudentSubscribed",
        }
    }

    fn tags(&self) -> Result<Vec<Tag>, InvalidTag> {
        match self {
            Self::CourseRegistered { course, .. } => Ok(vec![Tag::of("course", course)?]),
            Self::StudentRegistered { student, .. } => Ok(vec![Tag::of("student", student)?]),
            Self::StudentSubscribed { student, course } => Ok(vec![
                Tag::of("course", course)?,
                Tag::of("student", student)?,
            ]),
        }
    }
}

/// What the decision folds the course's and the student's events into.
#[derive(Default)]
struct Facts {
    places: Option<u32>,
    taken: u32,
    already: bool,
    max_courses: Option<u32>,
    courses: u32,
}

/// Subscribe `student` to `course`: the events tagged with either.
struct Subscribe {
    student: String,
    course: String,
    query: Query,
}

impl Subscribe {
    fn new(student: &str, course: &str) -> Self {
        let tag = |kind, value| Tag::of(kind, value).expect("a uuid makes a valid tag");
        Self {
            student: student.to_owned(),
            course: course.to_owned(),
            query: Query::from(QueryItem::tagged(tag("course", course)))
                .or(QueryItem::tagged(tag("student", student))),
        }
    }
}

impl Decision for Subscribe {
    type Event = EnrolmentEvent;
    type State = Facts;
    type Rejection = Refusal;

    fn query(&self) -> Query {
        self.query.clone()
    }

    fn evolve(&self, facts: &mut Facts, event: &EnrolmentEvent) {
        match event {
            EnrolmentEvent::CourseRegistered { places, .. } => facts.places = Some(*places),
            EnrolmentEvent::StudentRegistered { max_courses, .. } => {
                facts.max_courses = Some(*max_courses);
            }
            EnrolmentEvent::StudentSubscribed { student, course } => {
                if *course == self.course {
                    facts.taken += 1;
                    facts.already |= *student == self.student;
                }
                if *student == self.student {
                    facts.courses += 1;
                }
            }
        }
    }

    fn decide(&self, facts: &Facts) -> Result<Vec<EnrolmentEvent>, Refusal> {
        course_rule(facts.places, facts.taken, facts.already)?;
        student_rule(facts.max_courses, facts.courses)?;
        Ok(vec![EnrolmentEvent::StudentSubscribed {
            student: self.student.clone(),
            course: self.course.clone(),
        }])
    }
}

/// The stream a DCB event goes to: its course's (or student's).
fn dcb_stream(kind: &str, id: &str) -> StreamId {
    StreamId::new(format!("dcb_{kind}-{id}")).expect("a valid stream id")
}

/// One encoded enrolment event.
fn encode(codec: &EventCodec<EnrolmentEvent>, event: &EnrolmentEvent) -> NewEvent {
    codec.encode(event, Metadata::new()).expect("encode")
}

/// Registers a block on es-postgres in one atomic write of tagged events.
async fn register_tagged(store: &dyn EventStore, courses: &[String], students: &[String]) {
    let codec = EventCodec::new();
    let courses = courses.iter().map(|c| {
        let event = EnrolmentEvent::CourseRegistered {
            course: c.clone(),
            places: PLACES,
        };
        StreamAppend::new(
            dcb_stream("course", c),
            ExpectedVersion::NoStream,
            vec![encode(&codec, &event)],
        )
    });
    let students = students.iter().map(|s| {
        let event = EnrolmentEvent::StudentRegistered {
            student: s.clone(),
            max_courses: MAX_COURSES,
        };
        StreamAppend::new(
            dcb_stream("student", s),
            ExpectedVersion::NoStream,
            vec![encode(&codec, &event)],
        )
    });
    store
        .append_streams(courses.chain(students).collect())
        .await
        .expect("register a block");
}

/// Side 1: the decision through es-core's `DecisionRunner` (default retry
/// policy), its event appended to the course's stream.
struct OursDcb {
    store: Arc<Timed>,
    runner: DecisionRunner<EnrolmentEvent>,
}

impl Enrolment for OursDcb {
    async fn register(&self, courses: &[String], students: &[String]) {
        register_tagged(&self.store.inner, courses, students).await;
    }

    async fn subscribe(
        &self,
        student: &str,
        course: &str,
        conflicts: &AtomicU64,
    ) -> Result<(), NotSubscribed> {
        let decision = Subscribe::new(student, course);
        match self
            .runner
            .execute(&dcb_stream("course", course), &decision, Metadata::new())
            .await
        {
            Ok(decided) => {
                conflicts.fetch_add(u64::from(decided.attempts - 1), Ordering::Relaxed);
                Ok(())
            }
            Err(DecisionError::Rejected(refusal)) => Err(refusal.into()),
            Err(DecisionError::Contention { attempts }) => {
                conflicts.fetch_add(u64::from(attempts), Ordering::Relaxed);
                Err(NotSubscribed::GaveUp)
            }
            Err(e) => panic!("ours, DCB: {e}"),
        }
    }
}

/// Side 5, the floor: the subscription's tagged event appended to the
/// course's stream with no read and no condition.
struct Unconditional {
    store: Arc<Timed>,
    codec: EventCodec<EnrolmentEvent>,
}

impl Enrolment for Unconditional {
    async fn register(&self, _courses: &[String], _students: &[String]) {}

    async fn subscribe(
        &self,
        student: &str,
        course: &str,
        _: &AtomicU64,
    ) -> Result<(), NotSubscribed> {
        let event = EnrolmentEvent::StudentSubscribed {
            student: student.to_owned(),
            course: course.to_owned(),
        };
        self.store
            .append(
                &dcb_stream("course", course),
                ExpectedVersion::Any,
                vec![encode(&self.codec, &event)],
            )
            .await
            .expect("unconditional append");
        Ok(())
    }
}

/// es-postgres's store, timing the calls the subscriptions make (reads by
/// query or by stream, appends of every kind), to show where the time goes.
/// Registrations go to `inner` directly, untimed.
struct Timed {
    inner: PgEventStore,
    read_query: Stopwatch,
    read_stream: Stopwatch,
    append_if: Stopwatch,
    append: Stopwatch,
    append_streams: Stopwatch,
}

/// Calls and their total time.
#[derive(Default)]
struct Stopwatch {
    calls: AtomicU64,
    nanos: AtomicU64,
}

impl Stopwatch {
    async fn time<T>(&self, call: impl Future<Output = T>) -> T {
        let start = Instant::now();
        let out = call.await;
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
        out
    }

    /// The calls and their mean in milliseconds; then starts over.
    fn take(&self) -> (u64, f64) {
        let calls = self.calls.swap(0, Ordering::Relaxed);
        let nanos = self.nanos.swap(0, Ordering::Relaxed);
        (calls, nanos as f64 / 1e6 / calls.max(1) as f64)
    }
}

impl Timed {
    fn new(inner: PgEventStore) -> Self {
        Self {
            inner,
            read_query: Stopwatch::default(),
            read_stream: Stopwatch::default(),
            append_if: Stopwatch::default(),
            append: Stopwatch::default(),
            append_streams: Stopwatch::default(),
        }
    }

    /// Each kind of call made since the last time, as "mean ms × calls per
    /// subscription"; then starts over.
    fn take(&self, subscriptions: u64) -> String {
        let watches = [
            ("read by query", &self.read_query),
            ("read stream", &self.read_stream),
            ("append_if", &self.append_if),
            ("append", &self.append),
            ("append_streams", &self.append_streams),
        ];
        let mut calls = Vec::new();
        for (name, watch) in watches {
            let (count, mean) = watch.take();
            if count > 0 {
                let per = count as f64 / subscriptions.max(1) as f64;
                calls.push(format!("{name} {mean:.2} ms × {per:.2}"));
            }
        }
        calls.join(", ")
    }
}

#[async_trait]
impl EventStore for Timed {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        self.append
            .time(self.inner.append(stream, expected, events))
            .await
    }
    async fn append_streams(
        &self,
        parts: Vec<StreamAppend>,
    ) -> Result<Vec<AppendResult>, StoreError> {
        self.append_streams
            .time(self.inner.append_streams(parts))
            .await
    }
    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read_stream
            .time(self.inner.read_stream(stream, from_version, max_count))
            .await
    }
    async fn read_stream_events(
        &self,
        stream: &StreamId,
        from_version: u64,
        max_count: usize,
    ) -> Result<Vec<StreamEvent>, StoreError> {
        let read = self
            .inner
            .read_stream_events(stream, from_version, max_count);
        self.read_stream.time(read).await
    }
    async fn read_all(
        &self,
        after: Position,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_all(after, max_count).await
    }
    async fn stream_version(&self, stream: &StreamId) -> Result<u64, StoreError> {
        self.inner.stream_version(stream).await
    }
    async fn head(&self) -> Result<Position, StoreError> {
        self.inner.head().await
    }
    fn subscribe_all(
        &self,
        after: Position,
    ) -> BoxStream<'static, Result<RecordedEvent, StoreError>> {
        self.inner.subscribe_all(after)
    }
}

#[async_trait]
impl DcbStore for Timed {
    async fn read(
        &self,
        query: &Query,
        after: Position,
        max_count: usize,
    ) -> Result<QueryPage, StoreError> {
        self.read_query
            .time(DcbStore::read(&self.inner, query, after, max_count))
            .await
    }
    async fn append_if(
        &self,
        stream: &StreamId,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<AppendResult, StoreError> {
        self.append_if
            .time(self.inner.append_if(stream, events, condition))
            .await
    }
    fn subscribe(
        &self,
        query: Query,
        after: Position,
    ) -> BoxStream<'static, Result<RecordedEvent, StoreError>> {
        DcbStore::subscribe(&self.inner, query, after)
    }
}

// ---------- 2 and 3. es-core aggregates: Course and Student ----------

/// A course: its places (once registered) and its students.
#[derive(Default)]
struct Course {
    places: Option<u32>,
    students: Vec<String>,
}

/// (Courses and students are registered by appending their first event:
/// see [`Aggregates::register`].)
#[derive(Clone)]
enum CourseCommand {
    Subscribe(String),
    /// Withdraws a subscription the student refused (two-command path).
    Withdraw(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum CourseEvent {
    CourseRegistered { places: u32 },
    StudentSubscribed { student: String },
    SubscriptionWithdrawn { student: String },
}

impl DomainEvent for CourseEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::CourseRegistered { .. } => "CourseRegistered",
            Self::StudentSubscribed { .. } => "StudentSubscribed",
            Self::SubscriptionWithdrawn { .. } => "SubscriptionWithdrawn",
        }
    }
}

impl Aggregate for Course {
    type Event = CourseEvent;
    type Command = CourseCommand;
    type Error = Refusal;
    const TYPE: &'static str = "course";

    fn apply(&mut self, event: &CourseEvent) {
        match event {
            CourseEvent::CourseRegistered { places } => self.places = Some(*places),
            CourseEvent::StudentSubscribed { student } => self.students.push(student.clone()),
            CourseEvent::SubscriptionWithdrawn { student } => {
                self.students.retain(|s| s != student);
            }
        }
    }

    fn handle(&self, command: CourseCommand) -> Result<Vec<CourseEvent>, Refusal> {
        match command {
            CourseCommand::Subscribe(student) => {
                let taken = u32::try_from(self.students.len()).unwrap_or(u32::MAX);
                course_rule(self.places, taken, self.students.contains(&student))?;
                Ok(vec![CourseEvent::StudentSubscribed { student }])
            }
            CourseCommand::Withdraw(student) => {
                Ok(vec![CourseEvent::SubscriptionWithdrawn { student }])
            }
        }
    }
}

/// A student: their maximum (once registered) and how many courses they
/// take.
#[derive(Default)]
struct Student {
    max_courses: Option<u32>,
    courses: u32,
}

#[derive(Clone)]
enum StudentCommand {
    /// Takes the course named.
    Enrol(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum StudentEvent {
    StudentRegistered { max_courses: u32 },
    CourseTaken { course: String },
}

impl DomainEvent for StudentEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::StudentRegistered { .. } => "StudentRegistered",
            Self::CourseTaken { .. } => "CourseTaken",
        }
    }
}

impl Aggregate for Student {
    type Event = StudentEvent;
    type Command = StudentCommand;
    type Error = Refusal;
    const TYPE: &'static str = "student";

    fn apply(&mut self, event: &StudentEvent) {
        match event {
            StudentEvent::StudentRegistered { max_courses } => {
                self.max_courses = Some(*max_courses);
            }
            StudentEvent::CourseTaken { .. } => self.courses += 1,
        }
    }

    fn handle(&self, command: StudentCommand) -> Result<Vec<StudentEvent>, Refusal> {
        match command {
            StudentCommand::Enrol(course) => {
                student_rule(self.max_courses, self.courses)?;
                Ok(vec![StudentEvent::CourseTaken { course }])
            }
        }
    }
}

/// The repositories of both aggregates, retrying no conflict themselves
/// (the paths below retry and count them).
struct Aggregates {
    store: Arc<Timed>,
    courses: Repository<Course>,
    students: Repository<Student>,
}

impl Aggregates {
    fn new(store: Arc<Timed>) -> Self {
        Self {
            courses: Repository::new(store.clone()).with_retry(RetryPolicy::none()),
            students: Repository::new(store.clone()).with_retry(RetryPolicy::none()),
            store,
        }
    }

    /// Registers a block in one atomic write, as on the DCB side.
    async fn register(&self, courses: &[String], students: &[String]) {
        let meta = Metadata::new();
        let mut parts = Vec::with_capacity(courses.len() + students.len());
        for c in courses {
            let event = CourseEvent::CourseRegistered { places: PLACES };
            let event = self.courses.codec().encode(&event, meta.clone());
            parts.push(StreamAppend::new(
                self.courses.stream_id(c).expect("stream id"),
                ExpectedVersion::NoStream,
                vec![event.expect("encode")],
            ));
        }
        for s in students {
            let event = StudentEvent::StudentRegistered {
                max_courses: MAX_COURSES,
            };
            let event = self.students.codec().encode(&event, meta.clone());
            parts.push(StreamAppend::new(
                self.students.stream_id(s).expect("stream id"),
                ExpectedVersion::NoStream,
                vec![event.expect("encode")],
            ));
        }
        self.store
            .inner
            .append_streams(parts)
            .await
            .expect("register a block");
    }
}

/// `command` on aggregate `id` through `repo`, decided again after a lost
/// race (counted in `conflicts`) as `RetryPolicy::default()` would.
async fn execute<A: Aggregate<Error = Refusal>>(
    repo: &Repository<A>,
    id: &str,
    command: A::Command,
    conflicts: &AtomicU64,
) -> Result<(), NotSubscribed>
where
    A::Command: Clone,
{
    let policy = RetryPolicy::default();
    for attempt in 1..=policy.max_attempts {
        match repo.execute(id, command.clone(), &Metadata::new()).await {
            Ok(_) => return Ok(()),
            Err(RepositoryError::Rejected(refusal)) => return Err(refusal.into()),
            Err(RepositoryError::Contention { .. }) => {
                bump(conflicts);
                tokio::time::sleep(policy.backoff(attempt)).await;
            }
            Err(e) => panic!("ours, aggregates: {e}"),
        }
    }
    Err(NotSubscribed::GaveUp)
}

/// Side 2: two commands. The course takes the student, then the student
/// takes the course; when the student refuses, a third command withdraws
/// the course's subscription. Each aggregate keeps its half of the rule, but
/// between the commands the course counts a subscription that may be
/// withdrawn (and may refuse another student meanwhile): not atomic, the
/// gap DCB closes.
struct TwoCommands(Aggregates);

impl Enrolment for TwoCommands {
    async fn register(&self, courses: &[String], students: &[String]) {
        self.0.register(courses, students).await;
    }

    async fn subscribe(
        &self,
        student: &str,
        course: &str,
        conflicts: &AtomicU64,
    ) -> Result<(), NotSubscribed> {
        let subscribe = CourseCommand::Subscribe(student.to_owned());
        execute(&self.0.courses, course, subscribe, conflicts).await?;
        let enrol = StudentCommand::Enrol(course.to_owned());
        let enrolled = execute(&self.0.students, student, enrol, conflicts).await;
        if enrolled.is_err() {
            let withdraw = CourseCommand::Withdraw(student.to_owned());
            execute(&self.0.courses, course, withdraw, conflicts)
                .await
                .expect("a withdrawal is never refused");
        }
        enrolled
    }
}

/// Side 3: one `UnitOfWork`. The course and the student loaded, both
/// decided, both written in one `append_streams` expecting the versions
/// loaded (a refusal writes nothing). Atomic: the aggregate design that keeps the
/// whole rule, at the price of two stream reads and a two-stream write.
struct OneUnit(Aggregates);

impl Enrolment for OneUnit {
    async fn register(&self, courses: &[String], students: &[String]) {
        self.0.register(courses, students).await;
    }

    async fn subscribe(
        &self,
        student: &str,
        course: &str,
        conflicts: &AtomicU64,
    ) -> Result<(), NotSubscribed> {
        let policy = RetryPolicy::default();
        let (courses, students) = (&self.0.courses, &self.0.students);
        let meta = Metadata::new();
        for attempt in 1..=policy.max_attempts {
            let mut unit = UnitOfWork::new(self.0.store.clone());
            let command_id = uuid::Uuid::now_v7();
            let c = unit.load(courses, course).await.expect("load course");
            let s = unit.load(students, student).await.expect("load student");
            let subscribe = CourseCommand::Subscribe(student.to_owned());
            unit.decide(courses, course, c, subscribe, command_id, &meta)
                .expect("decide")?;
            unit.decide(
                students,
                student,
                s,
                StudentCommand::Enrol(course.to_owned()),
                command_id,
                &meta,
            )
            .expect("decide")?;
            match unit.commit().await {
                Ok(_) => return Ok(()),
                Err(StoreError::WrongExpectedVersion { .. }) => {
                    bump(conflicts);
                    tokio::time::sleep(policy.backoff(attempt)).await;
                }
                Err(e) => panic!("ours, unit of work: {e}"),
            }
        }
        Err(NotSubscribed::GaveUp)
    }
}

// ---------- 4. disintegrate ----------

#[derive(Clone, Debug, PartialEq, Eq, disintegrate::Event, Serialize, Deserialize)]
#[stream(CourseFacts, [CourseRegistered, StudentSubscribed])]
#[stream(StudentFacts, [StudentRegistered, StudentSubscribed])]
enum DisEvent {
    CourseRegistered {
        #[id]
        course_id: String,
        places: u32,
    },
    StudentRegistered {
        #[id]
        student_id: String,
        max_courses: u32,
    },
    StudentSubscribed {
        #[id]
        student_id: String,
        #[id]
        course_id: String,
    },
}

/// The course's events: its registration and its subscriptions.
#[derive(Clone, Debug, Default, StateQuery, Serialize, Deserialize)]
#[state_query(CourseFacts)]
struct DisCourse {
    #[id]
    course_id: String,
    places: Option<u32>,
    students: Vec<String>,
}

impl StateMutate for DisCourse {
    fn mutate(&mut self, event: CourseFacts) {
        match event {
            CourseFacts::CourseRegistered { places, .. } => self.places = Some(places),
            CourseFacts::StudentSubscribed { student_id, .. } => self.students.push(student_id),
        }
    }
}

/// The student's events: their registration and their subscriptions.
#[derive(Clone, Debug, Default, StateQuery, Serialize, Deserialize)]
#[state_query(StudentFacts)]
struct DisStudent {
    #[id]
    student_id: String,
    max_courses: Option<u32>,
    courses: u32,
}

impl StateMutate for DisStudent {
    fn mutate(&mut self, event: StudentFacts) {
        match event {
            StudentFacts::StudentRegistered { max_courses, .. } => {
                self.max_courses = Some(max_courses);
            }
            StudentFacts::StudentSubscribed { .. } => self.courses += 1,
        }
    }
}

/// Subscribe `student` to `course`, on the course's and the student's
/// states.
struct DisSubscribe {
    student: String,
    course: String,
}

impl disintegrate::Decision for DisSubscribe {
    type Event = DisEvent;
    type StateQuery = (DisCourse, DisStudent);
    type Error = Refusal;

    fn state_query(&self) -> Self::StateQuery {
        (
            DisCourse {
                course_id: self.course.clone(),
                ..DisCourse::default()
            },
            DisStudent {
                student_id: self.student.clone(),
                ..DisStudent::default()
            },
        )
    }

    fn process(&self, (course, student): &Self::StateQuery) -> Result<Vec<DisEvent>, Refusal> {
        let taken = u32::try_from(course.students.len()).unwrap_or(u32::MAX);
        course_rule(
            course.places,
            taken,
            course.students.contains(&self.student),
        )?;
        student_rule(student.max_courses, student.courses)?;
        Ok(vec![DisEvent::StudentSubscribed {
            student_id: self.student.clone(),
            course_id: self.course.clone(),
        }])
    }
}

type DisStore = disintegrate_postgres::PgEventStore<DisEvent, Json<DisEvent>>;

/// Side 4: disintegrate's decision maker (no snapshots), retried on its
/// conflicts as the others are.
struct Disintegrate {
    store: DisStore,
    maker: disintegrate_postgres::PgDecisionMaker<DisEvent, Json<DisEvent>, NoSnapshot>,
}

impl Disintegrate {
    /// Its store in `schema` (created here), on a pool of its own whose
    /// connections have `schema` as their search path: disintegrate's
    /// tables and functions are unqualified.
    ///
    /// disintegrate-postgres (every release since 2.0) does not initialize on
    /// PostgreSQL 15: its `event_store_begin_epoch()` masks the sequence's
    /// last value with the hex literal `0xFFFFFFFF`, which PostgreSQL reads
    /// only from version 16 on. So its migration runs with function bodies
    /// unchecked, and that one function is then replaced by one doing the
    /// same with the mask in decimal (see [`BEGIN_EPOCH_PG15`]).
    async fn new(schema: &str) -> (Self, PgPool) {
        let options = PgConnectOptions::from_str(&es_postgres::testing::database_url())
            .expect("database url")
            .options([("search_path", schema), ("check_function_bodies", "off")]);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .expect("connect for disintegrate");
        sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
            .execute(&pool)
            .await
            .expect("create disintegrate's schema");
        let store = DisStore::try_new(pool.clone(), Json::default())
            .await
            .expect("disintegrate's store");
        let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
            .fetch_one(&pool)
            .await
            .expect("server version");
        if version < 160_000 {
            sqlx::raw_sql(BEGIN_EPOCH_PG15)
                .execute(&pool)
                .await
                .expect("replace event_store_begin_epoch()");
        }
        let maker = disintegrate_postgres::decision_maker(store.clone(), NoSnapshot);
        (Self { store, maker }, pool)
    }
}

/// disintegrate-postgres's `event_store_begin_epoch()` (run at the start of
/// every append: shared transaction-level advisory locks on the database
/// and on the two halves of the event sequence's last value, which its
/// readers look up in `pg_locks`), written for PostgreSQL 15: the low half
/// masked with 4294967295 rather than `0xFFFFFFFF`.
const BEGIN_EPOCH_PG15: &str = "
CREATE OR REPLACE FUNCTION event_store_begin_epoch() RETURNS void AS $$
DECLARE
    last_id BIGINT;
    db OID;
BEGIN
    SELECT last_value INTO last_id FROM seq_event_event_id;
    SELECT oid INTO db FROM pg_database WHERE datname = current_database();
    PERFORM pg_try_advisory_xact_lock_shared(db::int, 0);
    PERFORM pg_try_advisory_xact_lock_shared(1, (last_id & 4294967295)::bit(32)::int);
    PERFORM pg_try_advisory_xact_lock_shared(2, (last_id >> 32)::bit(32)::int);
END
$$ LANGUAGE plpgsql";

/// Whether disintegrate failed for a concurrent writer: its check found an
/// event after the version read, or PostgreSQL refused the SERIALIZABLE
/// transaction it appends in.
fn dis_conflict(error: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    match error.downcast_ref::<disintegrate_postgres::Error>() {
        Some(disintegrate_postgres::Error::Concurrency) => true,
        Some(disintegrate_postgres::Error::Database(sqlx::Error::Database(db))) => {
            matches!(db.code().as_deref(), Some("40001" | "40P01"))
        }
        _ => false,
    }
}

impl Enrolment for Disintegrate {
    async fn register(&self, courses: &[String], students: &[String]) {
        use disintegrate::EventStore as _;
        let courses = courses.iter().map(|c| DisEvent::CourseRegistered {
            course_id: c.clone(),
            places: PLACES,
        });
        let students = students.iter().map(|s| DisEvent::StudentRegistered {
            student_id: s.clone(),
            max_courses: MAX_COURSES,
        });
        self.store
            .append_without_validation(courses.chain(students).collect())
            .await
            .expect("register a block");
    }

    async fn subscribe(
        &self,
        student: &str,
        course: &str,
        conflicts: &AtomicU64,
    ) -> Result<(), NotSubscribed> {
        let policy = RetryPolicy::default();
        for attempt in 1..=policy.max_attempts {
            let decision = DisSubscribe {
                student: student.to_owned(),
                course: course.to_owned(),
            };
            match self.maker.make(decision).await {
                Ok(_) => return Ok(()),
                Err(disintegrate::DecisionError::Domain(refusal)) => return Err(refusal.into()),
                Err(disintegrate::DecisionError::StateStore(e)) if dis_conflict(&*e) => {
                    bump(conflicts);
                    tokio::time::sleep(policy.backoff(attempt)).await;
                }
                Err(e) => panic!("disintegrate: {e:?}"),
            }
        }
        Err(NotSubscribed::GaveUp)
    }
}

// ---------- the harness ----------

/// One implementation of the enrolment.
trait Enrolment: Send + Sync + 'static {
    /// Registers courses of [`PLACES`] places and students of at most
    /// [`MAX_COURSES`] courses.
    fn register(&self, courses: &[String], students: &[String]) -> impl Future<Output = ()> + Send;

    /// Subscribes `student` to `course`, retrying conflicts (each one
    /// counted in `conflicts`) as `RetryPolicy::default()` says.
    fn subscribe(
        &self,
        student: &str,
        course: &str,
        conflicts: &AtomicU64,
    ) -> impl Future<Output = Result<(), NotSubscribed>> + Send;
}

/// A block's courses and students, to register.
type Block = (Vec<String>, Vec<String>);

/// A client's place in its blocks.
struct Cursor {
    courses: Vec<String>,
    students: Vec<String>,
    next: usize,
}

impl Cursor {
    fn new() -> Self {
        Self {
            courses: Vec::new(),
            students: Vec::new(),
            next: BLOCK * BLOCK,
        }
    }

    /// The next (student, course) pair, and the block to register first
    /// when it starts one.
    fn next(&mut self) -> (String, String, Option<Block>) {
        let mut fresh = None;
        if self.next == BLOCK * BLOCK {
            self.courses = (0..BLOCK).map(|_| id()).collect();
            self.students = (0..BLOCK).map(|_| id()).collect();
            self.next = 0;
            fresh = Some((self.courses.clone(), self.students.clone()));
        }
        let (s, c) = (self.next / BLOCK, self.next % BLOCK);
        self.next += 1;
        (self.students[s].clone(), self.courses[c].clone(), fresh)
    }
}

/// What the subscriptions of a measurement met.
#[derive(Default)]
struct Tally {
    /// Conflicts: a moved boundary, a wrong expected version, a
    /// serialization failure (each retried unless it was the last attempt).
    conflicts: AtomicU64,
    subscribed: AtomicU64,
    /// Refusals, by [`Refusal`] (none is expected: see the module's doc).
    refused: [AtomicU64; 5],
    gave_up: AtomicU64,
}

impl Tally {
    /// The refusals, and how many of each kind.
    fn refused(&self) -> String {
        let kinds = [
            Refusal::NoSuchCourse,
            Refusal::CourseFull,
            Refusal::AlreadySubscribed,
            Refusal::NoSuchStudent,
            Refusal::TooManyCourses,
        ];
        let mut total = 0;
        let mut seen = Vec::new();
        for kind in kinds {
            let count = self.refused[kind as usize].load(Ordering::Relaxed);
            if count > 0 {
                total += count;
                seen.push(format!("{kind} {count}"));
            }
        }
        match total {
            0 => "0".to_owned(),
            _ => format!("{total} ({})", seen.join(", ")),
        }
    }
}

/// One client's step: registers a block when it starts one, then decides
/// one subscription; the time the decision took, and whether it subscribed.
type Op = Arc<dyn Fn(usize) -> BoxFuture<'static, (Duration, bool)> + Send + Sync>;

/// The step of `side`'s clients, each through its own blocks, counting what
/// the subscriptions meet in `tally`.
fn op<T: Enrolment>(side: Arc<T>, tally: Arc<Tally>) -> Op {
    let cursors: Arc<Vec<Mutex<Cursor>>> = Arc::new(
        (0..MAX_CLIENTS)
            .map(|_| Mutex::new(Cursor::new()))
            .collect(),
    );
    Arc::new(move |client| {
        let (side, tally) = (side.clone(), tally.clone());
        let (student, course, fresh) = cursors[client].lock().expect("cursor").next();
        Box::pin(async move {
            if let Some((courses, students)) = fresh {
                side.register(&courses, &students).await;
            }
            let start = Instant::now();
            let outcome = side.subscribe(&student, &course, &tally.conflicts).await;
            let spent = start.elapsed();
            match outcome {
                Ok(()) => bump(&tally.subscribed),
                Err(NotSubscribed::Refused(kind)) => bump(&tally.refused[kind as usize]),
                Err(NotSubscribed::GaveUp) => bump(&tally.gave_up),
            }
            (spent, outcome.is_ok())
        })
    })
}

/// Decisions per second of `concurrency` clients running `op` for `time`:
/// each client's subscriptions made over the time it spent deciding
/// (registrations left out, failed attempts in), summed; and the
/// subscriptions made.
async fn run_decisions(concurrency: usize, time: Duration, op: &Op) -> (f64, u64) {
    let deadline = Instant::now() + time;
    let clients: Vec<_> = (0..concurrency)
        .map(|client| {
            let op = op.clone();
            tokio::spawn(async move {
                let (mut decisions, mut busy) = (0u64, Duration::ZERO);
                while Instant::now() < deadline {
                    let (spent, subscribed) = op(client).await;
                    busy += spent;
                    decisions += u64::from(subscribed);
                }
                (decisions, busy)
            })
        })
        .collect();
    let (mut rate, mut made) = (0.0, 0);
    for client in clients {
        let (decisions, busy) = client.await.expect("client panicked");
        made += decisions;
        if !busy.is_zero() {
            rate += decisions as f64 / busy.as_secs_f64();
        }
    }
    (rate, made)
}

/// CPU time used so far, in seconds: by this process (its clients and
/// their drivers) and by every PostgreSQL process (`/proc`, user + system,
/// reaped children included).
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    bench: f64,
    postgres: f64,
}

impl Cpu {
    fn now() -> Self {
        let mut cpu = Self {
            bench: std::fs::read_to_string("/proc/self/stat")
                .ok()
                .and_then(|stat| stat_cpu(&stat))
                .unwrap_or(0.0),
            postgres: 0.0,
        };
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let path = entry.path().join("stat");
            let Ok(stat) = std::fs::read_to_string(&path) else {
                continue;
            };
            if stat.contains("(postgres)") {
                cpu.postgres += stat_cpu(&stat).unwrap_or(0.0);
            }
        }
        cpu
    }

    fn since(self, before: Self) -> Self {
        Self {
            bench: self.bench - before.bench,
            postgres: self.postgres - before.postgres,
        }
    }
}

impl std::ops::AddAssign for Cpu {
    fn add_assign(&mut self, more: Self) {
        self.bench += more.bench;
        self.postgres += more.postgres;
    }
}

/// utime + stime + cutime + cstime of a `/proc/<pid>/stat` line, in seconds
/// (clock ticks of 1/100 s, as `/proc` reports them on Linux).
fn stat_cpu(stat: &str) -> Option<f64> {
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    let ticks: f64 = fields
        .get(11..15)?
        .iter()
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    Some(ticks / 100.0)
}

/// What a side's measured slices made and the CPU they used.
#[derive(Clone, Copy, Debug, Default)]
struct Used {
    decisions: u64,
    cpu: Cpu,
}

impl Used {
    /// Milliseconds of CPU per subscription made: PostgreSQL, this process.
    fn per_decision(&self) -> (f64, f64) {
        let n = self.decisions.max(1) as f64;
        (self.cpu.postgres * 1e3 / n, self.cpu.bench * 1e3 / n)
    }
}

/// The middle value (the upper one of an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The tables the scenario writes, analyzed before every slice.
///
/// As autovacuum would: without fresh statistics (this bench's server runs
/// with `autovacuum = off`), a session keeps the plans it made while the
/// tables were nearly empty, which may scan a table that has since grown.
/// es-postgres's DCB functions plan without sequential scans (with them, a
/// tagged append on one connection of pgbench grows from about 0.8 ms to
/// 2.4 ms in 20 s); the other sides' statements get no such help. ANALYZE
/// invalidates those plans.
struct Analyze<'a> {
    pool: &'a PgPool,
    tables: String,
}

impl Analyze<'_> {
    async fn run(&self) {
        sqlx::query(&format!("ANALYZE {}", self.tables))
            .execute(self.pool)
            .await
            .expect("analyze");
    }
}

/// Alternates the sides in three slices each, `ROUNDS` times, after a
/// warm-up of each: every side's decisions/s in every round, and what its
/// measured slices made and used. The tables are analyzed before every
/// slice (see [`Analyze`]).
async fn alternate(
    concurrency: usize,
    sides: &[Op],
    analyze: &Analyze<'_>,
) -> (Vec<Vec<f64>>, Vec<Used>) {
    for side in sides {
        analyze.run().await;
        run_decisions(concurrency, Duration::from_millis(200), side).await;
    }
    let slice = secs() / 3;
    let mut results = vec![Vec::new(); sides.len()];
    let mut used = vec![Used::default(); sides.len()];
    for _ in 0..dcb_rounds() {
        let mut sums = vec![0.0; sides.len()];
        for _ in 0..3 {
            for ((sum, side), used) in sums.iter_mut().zip(sides).zip(&mut used) {
                analyze.run().await;
                let before = Cpu::now();
                let (rate, made) = run_decisions(concurrency, slice, side).await;
                *sum += rate;
                used.decisions += made;
                used.cpu += Cpu::now().since(before);
            }
        }
        for (result, sum) in results.iter_mut().zip(sums) {
            result.push(sum / 3.0);
        }
    }
    (results, used)
}

/// Checks that `side` keeps the rule: a block's 100 subscriptions succeed,
/// and then each refusal comes when it should.
async fn check_rule<T: Enrolment>(name: &str, side: &T) {
    let conflicts = AtomicU64::new(0);
    let courses: Vec<String> = (0..BLOCK).map(|_| id()).collect();
    let students: Vec<String> = (0..BLOCK).map(|_| id()).collect();
    let (late, fresh, other, nobody, nowhere) = (id(), id(), id(), id(), id());
    side.register(
        &[courses.clone(), vec![fresh.clone(), other.clone()]].concat(),
        &[students.clone(), vec![late.clone()]].concat(),
    )
    .await;
    for s in &students {
        for c in &courses {
            let outcome = side.subscribe(s, c, &conflicts).await;
            assert_eq!(outcome, Ok(()), "{name}: a subscription within the rule");
        }
    }
    let cases = [
        (&late, &nowhere, Some(Refusal::NoSuchCourse)),
        (&nobody, &fresh, Some(Refusal::NoSuchStudent)),
        (&late, &courses[0], Some(Refusal::CourseFull)),
        (&students[0], &fresh, Some(Refusal::TooManyCourses)),
        // After the refusal above, `fresh` has no student (the two-command
        // path withdrew its subscription).
        (&late, &fresh, None),
        (&late, &fresh, Some(Refusal::AlreadySubscribed)),
        (&late, &other, None),
    ];
    for (student, course, refusal) in cases {
        let outcome = side.subscribe(student, course, &conflicts).await;
        let expected = refusal.map_or(Ok(()), |r| Err(NotSubscribed::Refused(r)));
        assert_eq!(outcome, expected, "{name}: {student} to {course}");
    }
    assert_eq!(conflicts.into_inner(), 0, "{name}: conflicts with no one");
}

/// Runs the scenario on `store` (es-postgres, in `schema`, migrated) and on
/// a disintegrate store in a schema of its own, dropped at the end.
pub(crate) async fn run(pool: &PgPool, schema: &str, store: &PgEventStore) {
    let dis_schema = format!("dis_{}", uuid::Uuid::new_v4().simple());
    let (dis, dis_pool) = Disintegrate::new(&dis_schema).await;
    let analyze = Analyze {
        pool,
        tables: format!("\"{schema}\".events, \"{schema}\".event_tags, \"{dis_schema}\".event"),
    };
    let dis = Arc::new(dis);
    let timed: Vec<Arc<Timed>> = (0..4)
        .map(|_| Arc::new(Timed::new(store.clone())))
        .collect();
    let ours = Arc::new(OursDcb {
        store: timed[0].clone(),
        runner: DecisionRunner::new(timed[0].clone()),
    });
    let two = Arc::new(TwoCommands(Aggregates::new(timed[1].clone())));
    let unit = Arc::new(OneUnit(Aggregates::new(timed[2].clone())));
    let floor = Arc::new(Unconditional {
        store: timed[3].clone(),
        codec: EventCodec::new(),
    });

    check_rule("ours, DCB", &*ours).await;
    check_rule("ours, two commands", &*two).await;
    check_rule("ours, unit of work", &*unit).await;
    check_rule("disintegrate", &*dis).await;
    for store in &timed {
        store.take(1);
    }

    let names = [
        "ours, DCB: es-core `DecisionRunner` on es-postgres (read by query + `append_if`)",
        "ours, aggregates: es-core `Repository`, Course then Student, 2 commands (NOT atomic)",
        "ours, aggregates: es-core `UnitOfWork`, Course + Student in 1 atomic 2-stream write",
        "disintegrate 4: `DecisionMaker` on disintegrate-postgres, (Course, Student) state",
        "floor: es-postgres tagged append, no read, no condition",
    ];
    // Which timed store each side of `names` uses (disintegrate: none).
    let timed_side = [Some(0), Some(1), Some(2), None, Some(3)];
    println!();
    println!(
        "DCB: subscribe a student to a course (course {PLACES} places, student at most \
         {MAX_COURSES} courses; query: course tag OR student tag). Subscriptions made per \
         second of deciding (median of {} rounds); at {MAX_CLIENTS} clients each client has \
         its own courses and students (disjoint boundaries). Conflicts, refusals and \
         give-ups count every attempt, warm-up included.",
        dcb_rounds()
    );
    println!();
    println!(
        "| implementation | clients | decisions/s | per round | conflicts | gave up | refused |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut medians = Vec::new();
    let mut per_round = Vec::new();
    let mut spent = Vec::new();
    let mut cpu = Vec::new();
    for clients in [1usize, MAX_CLIENTS] {
        let tallies: Vec<Arc<Tally>> = names.iter().map(|_| Arc::default()).collect();
        let sides = [
            op(ours.clone(), tallies[0].clone()),
            op(two.clone(), tallies[1].clone()),
            op(unit.clone(), tallies[2].clone()),
            op(dis.clone(), tallies[3].clone()),
            op(floor.clone(), tallies[4].clone()),
        ];
        let (results, used) = alternate(clients, &sides, &analyze).await;
        for (name, used) in names.iter().zip(used) {
            cpu.push((name, clients, used));
        }
        for (side, ((name, rates), tally)) in names.iter().zip(&results).zip(&tallies).enumerate() {
            let rounds: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
            println!(
                "| {name} | {clients} | {:.0} | {} | {} | {} | {} |",
                median(rates),
                rounds.join(", "),
                tally.conflicts.load(Ordering::Relaxed),
                tally.gave_up.load(Ordering::Relaxed),
                tally.refused(),
            );
            if let Some(t) = timed_side[side] {
                let subscribed = tally.subscribed.load(Ordering::Relaxed);
                spent.push((name, clients, timed[t].take(subscribed)));
            }
        }
        medians.push(results.iter().map(|r| median(r)).collect::<Vec<f64>>());
        per_round.push(results);
    }

    println!();
    println!("| ratio | median | per round |");
    println!("|---|---|---|");
    let ratios = [
        ("ours DCB / ours 2 commands (not atomic), 1 client", 0, 0, 1),
        ("ours DCB / ours unit of work (atomic), 1 client", 0, 0, 2),
        ("ours DCB / disintegrate, 1 client", 0, 0, 3),
        (
            "ours DCB / ours 2 commands (not atomic), 16 clients",
            1,
            0,
            1,
        ),
        ("ours DCB / ours unit of work (atomic), 16 clients", 1, 0, 2),
        ("ours DCB / disintegrate, 16 clients", 1, 0, 3),
        (
            "ours DCB, 16 clients, disjoint / unconditional tagged appends, 16 writers",
            1,
            0,
            4,
        ),
    ];
    for (name, level, a, b) in ratios {
        let rounds: Vec<String> = per_round[level][a]
            .iter()
            .zip(&per_round[level][b])
            .map(|(x, y)| format!("{:.2}", x / y))
            .collect();
        println!(
            "| {name} | {:.2}x | {} |",
            medians[level][a] / medians[level][b],
            rounds.join(", ")
        );
    }

    println!();
    println!(
        "Where our sides spend their time: each kind of store call, its mean, and how many \
         per subscription made (warm-up included):"
    );
    println!();
    println!("| implementation | clients | store calls |");
    println!("|---|---|---|");
    for (name, clients, calls) in spent {
        println!("| {name} | {clients} | {calls} |");
    }

    println!();
    println!(
        "CPU per subscription made, measured slices (the ANALYZE between slices left out): \
         PostgreSQL's processes and this one (the clients, their drivers and their stores), \
         from /proc:"
    );
    println!();
    println!("| implementation | clients | PostgreSQL | this process | total |");
    println!("|---|---|---|---|---|");
    for (name, clients, used) in cpu {
        let (postgres, bench) = used.per_decision();
        println!(
            "| {name} | {clients} | {postgres:.2} ms | {bench:.2} ms | {:.2} ms |",
            postgres + bench
        );
    }

    dis_pool.close().await;
    sqlx::query(&format!("DROP SCHEMA \"{dis_schema}\" CASCADE"))
        .execute(pool)
        .await
        .expect("drop disintegrate's schema");
}
