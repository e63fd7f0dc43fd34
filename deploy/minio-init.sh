#!/bin/sh
# One-shot MinIO set-up (compose service minio-init): the bucket, a policy limited to
# it, and the non-root access key the services use. Safe to run again.
set -eu
: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${HISTOMARKER_S3_ACCESS_KEY:?}" \
  "${HISTOMARKER_S3_SECRET_KEY:?}" "${HISTOMARKER_BUCKET:=histomarker}"
# .env.example's placeholders are public: refuse them rather than create the accounts.
for name in MINIO_ROOT_USER MINIO_ROOT_PASSWORD HISTOMARKER_S3_ACCESS_KEY HISTOMARKER_S3_SECRET_KEY; do
  eval "value=\$$name"
  case "$value" in
  *CHANGE-ME*)
    echo "minio-init: $name is still the CHANGE-ME placeholder of .env.example; set it in .env" >&2
    exit 1
    ;;
  esac
done

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "local/$HISTOMARKER_BUCKET"

policy=$(mktemp)
sed "s/@BUCKET@/$HISTOMARKER_BUCKET/g" /deploy/minio-policy.json >"$policy"
mc admin policy create local histomarker-rw "$policy"
mc admin user add local "$HISTOMARKER_S3_ACCESS_KEY" "$HISTOMARKER_S3_SECRET_KEY"
# Attaching twice fails with "already attached": not an error on a re-run.
mc admin policy attach local histomarker-rw --user "$HISTOMARKER_S3_ACCESS_KEY" 2>/dev/null ||
  mc admin user info local "$HISTOMARKER_S3_ACCESS_KEY" | grep -q histomarker-rw
echo "bucket $HISTOMARKER_BUCKET and user $HISTOMARKER_S3_ACCESS_KEY ready"
