// JDBC (Debian's libpostgresql-jdbc-java, PgJDBC) against pg_kms. Run by
// pgrx_tests/tests/clients.rs as
// `java -cp /usr/share/java/postgresql.jar JdbcApp.java [explicit] [view]`
// (PgJDBC connects over TCP: the test's cluster also listens on 127.0.0.1).
// The parts between `// recipe:` and `// end recipe` are quoted verbatim in
// docs/clients.md (the test checks that they match). Checks print what they
// checked, never a value.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;

public class JdbcApp {
    static int passed = 0;

    static void check(boolean cond, String what) {
        if (!cond) {
            System.out.println("FAILED: " + what);
            System.exit(1);
        }
        passed += 1;
        System.out.println("ok: " + what);
    }

    // recipe: jdbc explicit
    // PgJDBC types its parameters (setLong: int8, setString: varchar), so the
    // id can be bound twice: once for the column, once as the context.
    static final String INSERT = """
        INSERT INTO jdbc_customers (id, email, email_bidx, phone, name)
        VALUES (?, kms_encrypt(?, 'pii', ?::text), kms_blind_index(?, 'pii', NULL, 64),
                kms_encrypt(?, 'pii', ?::text), ?)""";

    static final String FIND_BY_EMAIL = """
        SELECT id, kms_decrypt(email, id::text) AS email, kms_decrypt(phone, id::text) AS phone, name
          FROM jdbc_customers
         WHERE email_bidx = kms_blind_index(?, 'pii', NULL, 64)  -- index scan
           AND kms_decrypt(email, id::text) = ?                  -- recheck""";

    static void addCustomer(Connection db, long id, String email, String phone, String name) throws SQLException {
        try (PreparedStatement st = db.prepareStatement(INSERT)) {
            st.setLong(1, id);
            st.setString(2, email);
            st.setLong(3, id);
            st.setString(4, email);
            st.setString(5, phone);
            st.setLong(6, id);
            st.setString(7, name);
            st.executeUpdate();
        }
    }

    static Long findByEmail(Connection db, String email) throws SQLException {
        try (PreparedStatement st = db.prepareStatement(FIND_BY_EMAIL)) {
            st.setString(1, email);
            st.setString(2, email);
            try (ResultSet rs = st.executeQuery()) {
                return rs.next() ? rs.getLong("id") : null;
            }
        }
    }
    // end recipe

    static void explicit(Connection db) throws SQLException {
        db.createStatement().execute("DELETE FROM jdbc_customers");
        for (int i = 1; i <= 10; i++) {
            addCustomer(db, i, "user" + i + "@example.com", String.format("+1 555 12%02d", i), "User " + i);
        }
        int right = 0;
        try (ResultSet rs = db.createStatement().executeQuery(
                "SELECT id, kms_decrypt(email, id::text) AS email, kms_decrypt(phone, id::text) AS phone FROM jdbc_customers ORDER BY id")) {
            while (rs.next()) {
                long i = rs.getLong(1);
                if (rs.getString(2).equals("user" + i + "@example.com") && rs.getString(3).equals(String.format("+1 555 12%02d", i))) {
                    right++;
                }
            }
        }
        check(right == 10, "PreparedStatement insert (10 rows), select decrypted");
        Long seven = findByEmail(db, "user7@example.com");
        check(seven != null && seven == 7, "blind-index lookup finds id 7");
        check(findByEmail(db, "nobody@example.com") == null, "lookup of an unknown value finds nothing");
        try (ResultSet rs = db.createStatement().executeQuery("SELECT email FROM jdbc_customers WHERE id = 1")) {
            rs.next();
            check(rs.getString(1).startsWith("kms:"), "encrypted_text arrives as kms:... text");
        }
    }

    // recipe: jdbc view
    // jdbc_accounts (email, phone protected, context id::text) is read and
    // written through the view pg_kms made for it, like a table.
    static List<Long> addAccounts(Connection db, List<String[]> accounts) throws SQLException {
        List<Long> ids = new ArrayList<>();
        try (PreparedStatement st = db.prepareStatement(
                "INSERT INTO jdbc_accounts_decrypted (email, phone, name) VALUES (?, ?, ?)", new String[] {"id"})) {
            for (String[] a : accounts) {
                st.setString(1, a[0]);
                st.setString(2, a[1]);
                st.setString(3, a[2]);
                st.addBatch();
            }
            st.executeBatch();
            try (ResultSet keys = st.getGeneratedKeys()) {
                while (keys.next()) {
                    ids.add(keys.getLong(1));
                }
            }
        }
        return ids;
    }
    // end recipe

    static String storedCounts(Connection db) throws SQLException {
        try (ResultSet rs = db.createStatement().executeQuery("""
                SELECT count(*) FILTER (WHERE kms_key_name(email) = 'pii'
                                          AND kms_decrypt(email, id::text) IS NOT NULL
                                          AND email_bidx = kms_blind_index(kms_decrypt(email, id::text), 'pii', NULL, 64)
                                          AND (phone IS NULL OR kms_decrypt(phone, id::text) IS NOT NULL)),
                       count(*)
                  FROM jdbc_accounts""")) {
            rs.next();
            return rs.getLong(1) + "/" + rs.getLong(2);
        }
    }

    static void view(Connection db) throws SQLException {
        db.createStatement().execute("DELETE FROM jdbc_accounts_decrypted");
        List<String[]> accounts = new ArrayList<>();
        for (int i = 1; i <= 10; i++) {
            accounts.add(new String[] {"f" + i + "@example.com", String.format("+1 555 13%02d", i), "F " + i});
        }
        List<Long> ids = addAccounts(db, accounts);
        check(ids.size() == 10 && new HashSet<>(ids).size() == 10, "executeBatch into the view: 10 generated ids read back");
        check(storedCounts(db).equals("10/10"), "all 10 rows stored encrypted with their id as context, blind index filled");
        try (PreparedStatement st = db.prepareStatement("SELECT email, name FROM jdbc_accounts_decrypted WHERE id = ?")) {
            st.setLong(1, ids.get(2));
            try (ResultSet rs = st.executeQuery()) {
                check(rs.next() && rs.getString(1).equals("f3@example.com") && rs.getString(2).equals("F 3"),
                      "the generated id of the third row selects its decrypted values");
            }
        }
        try (PreparedStatement st = db.prepareStatement("UPDATE jdbc_accounts_decrypted SET email = ? WHERE id = ?")) {
            st.setString(1, "three@example.org");
            st.setLong(2, ids.get(2));
            check(st.executeUpdate() == 1, "update through the view: 1 row");
        }
        try (PreparedStatement st = db.prepareStatement("DELETE FROM jdbc_accounts_decrypted WHERE id = ?")) {
            st.setLong(1, ids.get(0));
            check(st.executeUpdate() == 1, "delete through the view: 1 row");
        }
        check(storedCounts(db).equals("9/9"), "after update and delete: 9 rows, all stored right");
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + System.getenv("PGPORT") + "/" + System.getenv("PGDATABASE");
        try (Connection db = DriverManager.getConnection(url, System.getenv("PGUSER"), "")) {
            List<String> styles = args.length > 0 ? List.of(args) : List.of("explicit");
            for (String style : styles) {
                switch (style) {
                    case "explicit" -> explicit(db);
                    case "view" -> view(db);
                    default -> throw new IllegalArgumentException("unknown style " + style);
                }
            }
            System.out.println("PgJDBC " + db.getMetaData().getDriverVersion() + ": all " + passed + " checks ok");
        } catch (SQLException e) {
            System.out.println("FAILED: SQLSTATE " + e.getSQLState() + ": " + e.getMessage());
            System.exit(1);
        }
    }
}
