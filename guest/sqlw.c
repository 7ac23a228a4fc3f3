/* sqlw: one SQLite writer, for tests/test_guest.py (linked statically with libsqlite3).
 *
 *   sqlw DB NAME N     inserts N rows (NAME, i) into table t of DB, one transaction each
 *                      (BEGIN IMMEDIATE: the write lock first), waiting for the other writers
 *                      through SQLite's busy handler; prints "NAME done"
 *   sqlw DB check      prints "rows N" and the integrity check's answer
 *
 * SQLite serialises writers with POSIX record locks on the database file (fcntl F_SETLK):
 * across processes of one guest, of two guests, or a guest and the host, only locks the
 * file server takes on the host make that hold. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

static int fail(sqlite3 *db, const char *what) {
    fprintf(stderr, "sqlw: %s: %s\n", what, sqlite3_errmsg(db));
    return 1;
}

static int row(void *out, int n, char **vals, char **cols) {
    (void)cols;
    for (int i = 0; i < n; i++)
        printf("%s%s", i ? " " : "", vals[i] ? vals[i] : "NULL");
    printf("\n");
    (void)out;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: sqlw DB NAME N | sqlw DB check\n");
        return 2;
    }
    sqlite3 *db;
    if (sqlite3_open(argv[1], &db) != SQLITE_OK)
        return fail(db, "open");
    sqlite3_busy_timeout(db, 120000);
    if (strcmp(argv[2], "check") == 0) {
        if (sqlite3_exec(db, "SELECT 'rows', count(*) FROM t", row, NULL, NULL) != SQLITE_OK ||
            sqlite3_exec(db, "PRAGMA integrity_check", row, NULL, NULL) != SQLITE_OK)
            return fail(db, "check");
        return 0;
    }
    if (argc != 4)
        return 2;
    long n = strtol(argv[3], NULL, 10);
    if (sqlite3_exec(db, "CREATE TABLE IF NOT EXISTS t (who TEXT, i INTEGER)", NULL, NULL,
                     NULL) != SQLITE_OK)
        return fail(db, "create");
    sqlite3_stmt *ins;
    if (sqlite3_prepare_v2(db, "INSERT INTO t VALUES (?, ?)", -1, &ins, NULL) != SQLITE_OK)
        return fail(db, "prepare");
    for (long i = 0; i < n; i++) {
        if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK)
            return fail(db, "begin");
        sqlite3_bind_text(ins, 1, argv[2], -1, SQLITE_STATIC);
        sqlite3_bind_int64(ins, 2, i);
        if (sqlite3_step(ins) != SQLITE_DONE)
            return fail(db, "insert");
        sqlite3_reset(ins);
        if (sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
            return fail(db, "commit");
    }
    sqlite3_finalize(ins);
    sqlite3_close(db);
    printf("%s done\n", argv[2]);
    return 0;
}
