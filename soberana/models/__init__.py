"""soberana.models"""
