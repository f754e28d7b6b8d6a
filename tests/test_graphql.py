"""batchsync.graphql: DeferredExecutionContext against plain graphql-core schemas.

Runs with whichever graphql-core is installed: 3.2 in the test extra's environment, 3.3 in
the second environment that .ci/run makes. Every loader records what each batch call was
sent, and the tests assert on exactly that.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest

pytest.importorskip("graphql")

from graphql import GraphQLError, build_schema, execute, graphql_sync, parse, version_info

import batchsync
from batchsync import Batcher
from batchsync.graphql import DeferredExecutionContext

SDL = """
type User {
  id: Int!
  name: String
  friends: [User!]!
  friendsOrNull: [User]
  bestFriend: User
  strictFriend: User!
  nickname: String
  badge: String!
}
type Query {
  user(id: Int!): User
  strictUser(id: Int!): User!
  users(ids: [Int!]!): [User]
  boom: String
}
type Mutation {
  rename(id: Int!, name: String!): User
}
"""

# A level's keys go out when the context waits on them (eager, the default), never by the
# clock: a window the walk of a level cannot outlast keeps the calls the same on a busy machine.
WINDOW = 5.0

# graphql-core 3.3 renamed the argument.
CONTEXT_ARG = "executor_class" if version_info >= (3, 3) else "execution_context_class"

# Each user has two friends, ids one and two above its own, and a best friend one above.
NAMES = {i: f"user {i}" for i in range(1, 40)}


def user_row(i: int) -> dict[str, Any]:
    return {"id": i, "name": NAMES[i], "friends": [i + 1, i + 2], "best": i + 1}


class Recorder:
    """A batch function that records the keys of every call; failing keys get an error."""

    def __init__(self, fail: frozenset[int] = frozenset()) -> None:
        self.calls: list[list[int]] = []
        self.threads: list[str] = []
        self.fail = fail

    def __call__(self, keys: list[int]) -> list[Any]:
        self.calls.append(list(keys))
        self.threads.append(threading.current_thread().name)
        return [ValueError(f"no user {k}") if k in self.fail else user_row(k) for k in keys]


@pytest.fixture
def record() -> Recorder:
    return Recorder()


@pytest.fixture
def users(record: Recorder) -> Iterator[Batcher[int, Any]]:
    with Batcher(record, name="users", window=WINDOW) as batcher:
        yield batcher


def make_schema(users: Batcher[int, Any], **extra: Callable[..., Any]) -> Any:
    """The test schema; every resolver that needs a user returns users.load(id)."""
    schema = build_schema(SDL)
    query = schema.query_type
    user = schema.type_map["User"]
    resolvers: dict[tuple[Any, str], Callable[..., Any]] = {
        (query, "user"): lambda _, info, id: users.load(id),
        (query, "strictUser"): lambda _, info, id: users.load(id),
        (query, "users"): lambda _, info, ids: [users.load(i) for i in ids],
        (user, "friends"): lambda u, info: [users.load(i) for i in u["friends"]],
        (user, "friendsOrNull"): lambda u, info: [users.load(i) for i in u["friends"]],
        (user, "bestFriend"): lambda u, info: users.load(u["best"]),
        (user, "strictFriend"): lambda u, info: users.load(u["best"]),
    }
    for (parent, name), fn in resolvers.items():
        parent.fields[name].resolve = fn
    for name, fn in extra.items():
        parent_name, _, field = name.partition("__")
        schema.type_map[parent_name].fields[field].resolve = fn
    return schema


def run(schema: Any, query: str, **kw: Any) -> Any:
    return graphql_sync(
        schema, query, **{CONTEXT_ARG: kw.pop("context", DeferredExecutionContext)}, **kw
    )


def errors_of(result: Any) -> list[tuple[str, list[Any]]]:
    return sorted((e.message, e.path) for e in result.errors or [])


# -- values and batching ---------------------------------------------------------------------


def test_a_list_of_futures(users: Batcher[int, Any], record: Recorder) -> None:
    result = run(make_schema(users), "{ users(ids: [3, 1, 2]) { id name } }")
    assert result.errors is None
    assert result.data == {
        "users": [
            {"id": 3, "name": "user 3"},
            {"id": 1, "name": "user 1"},
            {"id": 2, "name": "user 2"},
        ]
    }
    assert record.calls == [[3, 1, 2]]


def test_a_future_of_a_list(users: Batcher[int, Any], record: Recorder) -> None:
    # friends as one future per user, of the list of its friends' rows (a one-to-many
    # loader); the rows' own fields then load the next level.
    def rows(keys: list[int]) -> list[list[dict[str, Any]]]:
        return [[user_row(k + 1), user_row(k + 2)] for k in keys]

    with Batcher(rows, name="friend_rows", window=WINDOW) as friend_rows:
        schema = make_schema(users, User__friends=lambda u, info: friend_rows.load(u["id"]))
        result = run(schema, "{ users(ids: [1, 4]) { friends { id bestFriend { id } } } }")
    assert result.errors is None
    assert result.data == {
        "users": [
            {"friends": [{"id": 2, "bestFriend": {"id": 3}}, {"id": 3, "bestFriend": {"id": 4}}]},
            {"friends": [{"id": 5, "bestFriend": {"id": 6}}, {"id": 6, "bestFriend": {"id": 7}}]},
        ]
    }
    assert record.calls == [[1, 4], [3, 4, 6, 7]]


def test_four_levels_one_call_per_level(users: Batcher[int, Any], record: Recorder) -> None:
    query = "{ user(id: 1) { id friends { id friends { id friends { id name } } } } }"
    result = run(make_schema(users), query)
    assert result.errors is None
    level2 = result.data["user"]["friends"]
    assert [f["id"] for f in level2] == [2, 3]
    assert [[f["id"] for f in g["friends"]] for g in level2] == [[3, 4], [4, 5]]
    leaves = [h["name"] for g in level2 for f in g["friends"] for h in f["friends"]]
    assert leaves == [NAMES[i] for i in (4, 5, 5, 6, 5, 6, 6, 7)]
    # One call per level: every sibling key of a level is sent together, each key once.
    assert record.calls == [[1], [2, 3], [3, 4, 5], [4, 5, 6, 7]]


def test_the_same_key_under_two_aliases_is_sent_once(
    users: Batcher[int, Any], record: Recorder
) -> None:
    result = run(make_schema(users), "{ a: user(id: 7) { id } b: user(id: 7) { name } }")
    assert result.data == {"a": {"id": 7}, "b": {"name": "user 7"}}
    assert record.calls == [[7]]


def test_fields_keep_their_order_between_deferred_and_plain_ones(
    users: Batcher[int, Any], record: Recorder
) -> None:
    schema = make_schema(users, Query__boom=lambda _, info: "plain")
    result = run(schema, "{ a: user(id: 1) { id } b: boom c: user(id: 2) { id } d: boom }")
    assert result.errors is None
    assert list(result.data) == ["a", "b", "c", "d"]
    assert result.data == {"a": {"id": 1}, "b": "plain", "c": {"id": 2}, "d": "plain"}
    assert record.calls == [[1, 2]]


def test_the_same_answers_as_resolvers_that_block(users: Batcher[int, Any]) -> None:
    # The reference: the same schema with resolvers that return values (users.get), run by
    # graphql-core's own execution context.
    query = """{ users(ids: [1, 5, 9]) { id name bestFriend { name friends { id name } }
                 friendsOrNull { id bestFriend { id } } } }"""
    deferred = run(make_schema(users), query)

    def get(fn: Callable[..., Any]) -> Callable[..., Any]:
        def resolve(*args: Any, **kwargs: Any) -> Any:
            value = fn(*args, **kwargs)
            if isinstance(value, list):
                return [v.result() if isinstance(v, Future) else v for v in value]
            return value.result() if isinstance(value, Future) else value

        return resolve

    blocking = make_schema(users)
    for type_ in (blocking.query_type, blocking.type_map["User"]):
        for field in type_.fields.values():
            if field.resolve is not None:
                field.resolve = get(field.resolve)
    assert graphql_sync(blocking, query).formatted == deferred.formatted
    assert deferred.errors is None


def test_values_are_completed_in_the_request_thread(
    users: Batcher[int, Any], record: Recorder
) -> None:
    seen: list[str] = []

    def name(u: dict[str, Any], info: Any) -> str:
        seen.append(threading.current_thread().name)
        return str(u["name"])

    result = run(make_schema(users, User__name=name), "{ user(id: 1) { friends { name } } }")
    assert result.data == {"user": {"friends": [{"name": "user 2"}, {"name": "user 3"}]}}
    assert seen == [threading.current_thread().name] * 2
    assert all(t.startswith("batchsync-users") for t in record.threads)


def test_concurrent_operations_share_calls(record: Recorder) -> None:
    # eager=False: a level's keys ride the window, so those of other threads join them.
    threads = 8
    start = threading.Barrier(threads)
    results: list[Any] = [None] * threads
    with Batcher(record, name="users", eager=False, window=0.05) as shared:
        schema = make_schema(shared)

        def one(i: int) -> None:
            start.wait(10)
            results[i] = run(schema, f"{{ user(id: {i + 1}) {{ bestFriend {{ name }} }} }}")

        workers = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(30)
    assert [r.data for r in results] == [
        {"user": {"bestFriend": {"name": f"user {i + 2}"}}} for i in range(threads)
    ]
    assert sum(len(c) for c in record.calls) >= threads  # every key was sent
    assert len(record.calls) < 2 * threads  # ... in fewer calls than one per operation


def test_a_done_future_is_completed_at_once(users: Batcher[int, Any], record: Recorder) -> None:
    done: Future[Any] = Future()
    done.set_result(user_row(3))
    schema = make_schema(users, Query__user=lambda _, info, id: done)
    assert run(schema, "{ user(id: 3) { name } }").data == {"user": {"name": "user 3"}}
    assert record.calls == []


def test_a_scope_cache_serves_a_later_level(record: Recorder) -> None:
    with Batcher(record, name="users", cache="scope", window=WINDOW) as cached, batchsync.scope():
        result = run(make_schema(cached), "{ users(ids: [1, 2]) { bestFriend { id } } }")
    assert result.data == {"users": [{"bestFriend": {"id": 2}}, {"bestFriend": {"id": 3}}]}
    assert record.calls == [[1, 2], [3]]  # user 2 came from the scope's memo


def test_an_is_awaitable_the_caller_chose_is_kept(users: Batcher[int, Any]) -> None:
    asked: list[Any] = []

    def predicate(value: Any) -> bool:
        asked.append(value)
        return False

    document = parse("{ user(id: 1) { name } }")
    result = execute(
        make_schema(users),
        document,
        is_awaitable=predicate,
        **{CONTEXT_ARG: DeferredExecutionContext},
    )
    assert result.data == {"user": {"name": "user 1"}}
    assert "user 1" in asked


# -- errors ----------------------------------------------------------------------------------


def test_one_failing_key_is_one_error_at_its_path() -> None:
    record = Recorder(fail=frozenset({5}))
    with Batcher(record, name="users", window=WINDOW) as users:
        result = run(make_schema(users), "{ users(ids: [4, 5, 6]) { id name } }")
    assert result.data == {
        "users": [{"id": 4, "name": "user 4"}, None, {"id": 6, "name": "user 6"}]
    }
    assert errors_of(result) == [("no user 5", ["users", 1])]
    assert record.calls == [[4, 5, 6]]


def test_a_non_null_field_failing_nulls_its_parent() -> None:
    # strictFriend is User!: user 8's best friend (9) fails, so user 8 itself becomes null;
    # its siblings in the list keep their values.
    record = Recorder(fail=frozenset({9}))
    with Batcher(record, name="users", window=WINDOW) as users:
        result = run(
            make_schema(users),
            "{ users(ids: [7, 8]) { id strictFriend { id } bestFriend { id } } }",
        )
    assert result.data == {
        "users": [{"id": 7, "strictFriend": {"id": 8}, "bestFriend": {"id": 8}}, None]
    }
    assert errors_of(result) == [("no user 9", ["users", 1, "strictFriend"])]


def test_non_null_all_the_way_up_nulls_the_data() -> None:
    record = Recorder(fail=frozenset({3}))
    with Batcher(record, name="users", window=WINDOW) as users:
        result = run(make_schema(users), "{ strictUser(id: 2) { strictFriend { id } } }")
    assert result.data is None
    assert errors_of(result) == [("no user 3", ["strictUser", "strictFriend"])]


def test_a_future_of_null_for_a_non_null_field_is_the_usual_error(
    users: Batcher[int, Any],
) -> None:
    with Batcher(
        lambda keys: {}, name="badges", window=WINDOW
    ) as badges:  # every key resolves to None
        schema = make_schema(users, User__badge=lambda u, info: badges.load(u["id"]))
        result = run(schema, "{ user(id: 1) { id badge } }")
    assert result.data == {"user": None}
    assert errors_of(result) == [
        ("Cannot return null for non-nullable field User.badge.", ["user", "badge"])
    ]


def test_a_resolver_raising_next_to_pending_futures(
    users: Batcher[int, Any], record: Recorder
) -> None:
    def nickname(u: dict[str, Any], info: Any) -> str:
        if u["id"] == 2:
            raise GraphQLError("no nickname for 2")
        return f"nick {u['id']}"

    schema = make_schema(users, User__nickname=nickname)
    result = run(
        schema, "{ users(ids: [1, 2, 3]) { nickname bestFriend { id } } boom: user(id: 9) { id } }"
    )
    assert result.data == {
        "users": [
            {"nickname": "nick 1", "bestFriend": {"id": 2}},
            {"nickname": None, "bestFriend": {"id": 3}},
            {"nickname": "nick 3", "bestFriend": {"id": 4}},
        ],
        "boom": {"id": 9},
    }
    assert errors_of(result) == [("no nickname for 2", ["users", 1, "nickname"])]
    assert record.calls == [[1, 2, 3, 9], [2, 3, 4]]


def test_a_resolver_raising_at_the_root_beside_pending_futures(
    users: Batcher[int, Any], record: Recorder
) -> None:
    def boom(_: Any, info: Any) -> str:
        raise RuntimeError("root failure")

    result = run(make_schema(users, Query__boom=boom), "{ a: user(id: 1) { id } boom }")
    assert result.data == {"a": {"id": 1}, "boom": None}
    assert errors_of(result) == [("root failure", ["boom"])]


def test_a_whole_failed_batch_fails_each_field() -> None:
    def broken(keys: list[int]) -> list[Any]:
        raise ConnectionError("database gone")

    with Batcher(broken, name="users", window=WINDOW) as users:
        result = run(make_schema(users), "{ a: user(id: 1) { id } b: user(id: 2) { id } }")
    assert result.data == {"a": None, "b": None}
    assert errors_of(result) == [("database gone", ["a"]), ("database gone", ["b"])]


def test_a_nulled_parent_loads_nothing_more_below_it() -> None:
    # Level 2 fails user 2's non-null strictFriend (key 3), which nulls users[0]; its
    # friends, pending at the same level, are not completed, so level 3 never loads them.
    record = Recorder(fail=frozenset({3}))
    with Batcher(record, name="users", window=WINDOW) as users:
        result = run(
            make_schema(users),
            "{ users(ids: [2]) { strictFriend { id } friends { bestFriend { id } } } }",
        )
    assert result.data == {"users": [None]}
    assert errors_of(result) == [("no user 3", ["users", 0, "strictFriend"])]
    assert record.calls == [[2], [3, 4]]


def test_an_operation_timeout_is_a_field_error(users: Batcher[int, Any]) -> None:
    class Impatient(DeferredExecutionContext):
        timeout = 0.05

    never: Future[Any] = Future()  # a fake: a load that never ends, which batchsync prevents
    schema = make_schema(users, Query__boom=lambda _, info: never)
    result = run(schema, "{ a: user(id: 1) { id } boom }", context=Impatient)
    assert result.data == {"a": {"id": 1}, "boom": None}
    assert errors_of(result) == [
        ("batchsync.graphql: no value within the operation's timeout of 0.05 s", ["boom"])
    ]


# -- mutations -------------------------------------------------------------------------------


def test_mutation_fields_run_one_after_the_other(record: Recorder) -> None:
    events: list[str] = []

    def write(keys: list[tuple[int, str]]) -> list[Any]:
        events.append(f"write {keys}")
        for i, name in keys:
            NAMES[i] = name
        return [user_row(i) for i, _ in keys]

    original = dict(NAMES)
    try:
        with (
            Batcher(write, name="writes", window=WINDOW) as writes,
            Batcher(record, name="users", window=WINDOW) as users,
        ):

            def rename(_: Any, info: Any, id: int, name: str) -> Future[Any]:
                events.append(f"rename {id}")
                return writes.load((id, name))

            def friends(u: dict[str, Any], info: Any) -> list[Future[Any]]:
                events.append(f"friends of {u['id']}")
                return [users.load(i) for i in u["friends"]]

            schema = make_schema(users, Mutation__rename=rename, User__friends=friends)
            result = run(
                schema,
                """mutation { a: rename(id: 1, name: "ann") { name friends { name } }
                              b: rename(id: 2, name: "bob") { name friends { name } } }""",
            )
    finally:
        NAMES.clear()
        NAMES.update(original)
    assert result.errors is None
    # b's write comes after a is complete, so a's friends (2, 3) were loaded before bob.
    assert result.data == {
        "a": {"name": "ann", "friends": [{"name": "user 2"}, {"name": "user 3"}]},
        "b": {"name": "bob", "friends": [{"name": "user 3"}, {"name": "user 4"}]},
    }
    assert events == [
        "rename 1",
        "write [(1, 'ann')]",
        "friends of 1",
        "rename 2",
        "write [(2, 'bob')]",
        "friends of 2",
    ]
    assert record.calls == [[2, 3], [3, 4]]


# -- graphql-sync-dataloaders' scenarios (its tests/test_dataloader.py), written anew -------

FRIENDS_SDL = """
type Person { name: String bestFriend: Person }
type Query { person(id: String): Person people: [Person] }
"""


def people_schema(people: Batcher[str, Any]) -> Any:
    schema = build_schema(FRIENDS_SDL)
    schema.query_type.fields["person"].resolve = lambda _, info, id: people.load(id)
    schema.query_type.fields["people"].resolve = lambda _, info: people.load_many(["1", "2", "3"])
    best = schema.type_map["Person"].fields["bestFriend"]
    best.resolve = lambda p, info: people.load(p["best"]) if p["best"] else None
    return schema


class People:
    """Laura and Dave have Sarah as best friend; Sarah has none (or has left, with fail)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.rows: dict[str, Any] = {
            "1": {"name": "Laura", "best": "2"},
            "2": ValueError("Sarah has left") if fail else {"name": "Sarah", "best": None},
            "3": {"name": "Dave", "best": "2"},
        }

    def __call__(self, keys: list[str]) -> list[Any]:
        self.calls.append(list(keys))
        return [self.rows[k] for k in keys]


def test_port_two_root_fields_share_a_call() -> None:
    people = People()
    with Batcher(people, window=WINDOW) as loader:
        result = run(
            people_schema(loader), '{ a: person(id: "1") { name } b: person(id: "2") { name } }'
        )
    assert result.data == {"a": {"name": "Laura"}, "b": {"name": "Sarah"}}
    assert people.calls == [["1", "2"]]


def test_port_nested_best_friends_in_two_calls() -> None:
    people = People()
    query = """{ a: person(id: "1") { name bestFriend { name } }
                 b: person(id: "3") { name bestFriend { name } } }"""
    with Batcher(people, window=WINDOW) as loader:
        result = run(people_schema(loader), query)
    assert result.errors is None
    assert result.data == {
        "a": {"name": "Laura", "bestFriend": {"name": "Sarah"}},
        "b": {"name": "Dave", "bestFriend": {"name": "Sarah"}},
    }
    assert people.calls == [["1", "3"], ["2"]]


def test_port_a_list_with_a_missing_best_friend_from_the_scope_memo() -> None:
    people = People()
    with Batcher(people, cache="scope", window=WINDOW) as loader, batchsync.scope():
        result = run(people_schema(loader), "{ people { name bestFriend { name } } }")
    assert result.errors is None
    assert result.data == {
        "people": [
            {"name": "Laura", "bestFriend": {"name": "Sarah"}},
            {"name": "Sarah", "bestFriend": None},
            {"name": "Dave", "bestFriend": {"name": "Sarah"}},
        ]
    }
    assert people.calls == [["1", "2", "3"]]  # Sarah, once loaded, comes from the memo


def test_port_a_failing_key_everywhere_it_is_used() -> None:
    people = People(fail=True)
    with Batcher(people, cache="scope", window=WINDOW) as loader, batchsync.scope():
        result = run(people_schema(loader), "{ people { name bestFriend { name } } }")
    assert result.data == {
        "people": [
            {"name": "Laura", "bestFriend": None},
            None,
            {"name": "Dave", "bestFriend": None},
        ]
    }
    assert errors_of(result) == [
        ("Sarah has left", ["people", 0, "bestFriend"]),
        ("Sarah has left", ["people", 1]),
        ("Sarah has left", ["people", 2, "bestFriend"]),
    ]
    # A failure is never cached: the next level asks for Sarah again.
    assert people.calls == [["1", "2", "3"], ["2"]]
