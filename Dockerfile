# One image for the four services (the command picks the service); see docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONPATH=/app PYTHONUNBUFFERED=1
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock
COPY tally ./tally
COPY services ./services
COPY gateway ./gateway
RUN useradd --system --uid 10001 tally
USER tally
