"""How the PostgreSQL adapter rewrites the store's SQL: `?` placeholders as the
protocol's numbered ones, and a small batch of rows for one INSERT as a single
multi-row statement (one statement for a journal entry's lines). Pure text: no server
needed."""

from __future__ import annotations

from extrabalance.ledger.postgres import MULTI_ROW_MAX, multi_row_insert, to_numbered


def test_placeholders_are_numbered_and_quoted_text_is_left_alone() -> None:
    assert to_numbered("SELECT a FROM t WHERE b = ? AND c LIKE '?%' AND d = ?") == (
        b"SELECT a FROM t WHERE b = $1 AND c LIKE '?%' AND d = $2")
    assert to_numbered('SELECT "a?" % 2 FROM t WHERE b = ?') == (
        b'SELECT "a?" % 2 FROM t WHERE b = $1')


def test_an_insert_of_several_rows_is_one_statement_of_row_groups() -> None:
    sql = "INSERT INTO journal (tx_id, line_no, amount) VALUES (?, ?, ?)"
    assert multi_row_insert(sql, 3) == (
        "INSERT INTO journal (tx_id, line_no, amount) VALUES (?, ?, ?), (?, ?, ?), (?, ?, ?)")


def test_a_tail_without_placeholders_is_kept_after_the_rows() -> None:
    sql = "INSERT INTO r (c, m) VALUES (?, ?) ON CONFLICT (c, m) DO NOTHING"
    assert multi_row_insert(sql, 2) == (
        "INSERT INTO r (c, m) VALUES (?, ?), (?, ?) ON CONFLICT (c, m) DO NOTHING")


def test_statements_it_cannot_rewrite_in_order_go_a_row_at_a_time() -> None:
    # a placeholder after the rows would take a row's value
    assert multi_row_insert(
        "INSERT INTO r (c, m) VALUES (?, ?) ON CONFLICT (c) DO UPDATE SET m = ?", 2) is None
    assert multi_row_insert("UPDATE r SET m = ? WHERE c = ?", 2) is None
    assert multi_row_insert("INSERT INTO r (c, m) SELECT ?, m FROM s", 2) is None
    assert MULTI_ROW_MAX > 4  # a journal entry's lines fit
