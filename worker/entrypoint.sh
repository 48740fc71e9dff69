# Prefect reads its settings from the environment only: export the API's auth string from the
# stack's secrets (mounted at /secrets by docker-compose.yml), then run the image's entrypoint.
if [ -r /secrets/api-auth-string ]; then
  PREFECT_API_AUTH_STRING="$(cat /secrets/api-auth-string)"
  export PREFECT_API_AUTH_STRING
fi
exec /opt/prefect/entrypoint.sh "$@"
