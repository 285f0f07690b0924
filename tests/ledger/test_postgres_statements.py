"""How the PostgreSQL adapter rewrites the store's SQL: `?` placeholders as psycopg's,
and a small batch of rows for one INSERT as a single multi-row statement (one round
trip for a journal entry's lines). Pure text: no server needed."""

from __future__ import annotations

from extrabalance.ledger.postgres import MULTI_ROW_MAX, multi_row_insert, to_pyformat


def test_placeholders_become_pyformat_and_quoted_text_is_left_alone() -> None:
    assert to_pyformat("SELECT a FROM t WHERE b = ? AND c LIKE '?%' AND d = ?") == (
        "SELECT a FROM t WHERE b = %s AND c LIKE '?%' AND d = %s")
    assert to_pyformat("SELECT 5 % 2") == "SELECT 5 %% 2"


def test_an_insert_of_several_rows_is_one_statement_of_row_groups() -> None:
    sql = "INSERT INTO journal (tx_id, line_no, amount) VALUES (?, ?, ?)"
    assert multi_row_insert(sql, 3) == (
        "INSERT INTO journal (tx_id, line_no, amount) VALUES (%s, %s, %s), (%s, %s, %s),"
        " (%s, %s, %s)")


def test_a_tail_without_placeholders_is_kept_after_the_rows() -> None:
    sql = "INSERT INTO r (c, m) VALUES (?, ?) ON CONFLICT (c, m) DO NOTHING"
    assert multi_row_insert(sql, 2) == (
        "INSERT INTO r (c, m) VALUES (%s, %s), (%s, %s) ON CONFLICT (c, m) DO NOTHING")


def test_statements_it_cannot_rewrite_in_order_are_left_to_executemany() -> None:
    # a placeholder after the rows would take a row's value
    assert multi_row_insert(
        "INSERT INTO r (c, m) VALUES (?, ?) ON CONFLICT (c) DO UPDATE SET m = ?", 2) is None
    assert multi_row_insert("UPDATE r SET m = ? WHERE c = ?", 2) is None
    assert multi_row_insert("INSERT INTO r (c, m) SELECT ?, m FROM s", 2) is None
    assert MULTI_ROW_MAX > 4  # a journal entry's lines fit
